//! The subnet file (`/run/overlayd/subnet.env`): how overlayd tells the CNI plugin which subnet this
//! node leased. Shell-sourceable `KEY=value` lines, the same shape as flannel's `subnet.env`:
//!
//! ```text
//! OVERLAY_NETWORK=10.244.0.0/16
//! OVERLAY_SUBNET=10.244.7.1/24
//! OVERLAY_MTU=8951
//! OVERLAY_IPMASQ=true
//! ```
//!
//! `OVERLAY_SUBNET` carries the gateway address (`.1`) with the subnet's prefix length.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

pub const DEFAULT_SUBNET_FILE: &str = "/run/overlayd/subnet.env";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetFile {
    /// The whole cluster network (`Network` in the etcd config).
    pub network: Ipv4Network,
    /// This node's subnet, with the network address (`10.244.7.0/24`).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ip_masq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error(
        "subnet file {path} does not exist: overlayd has not leased a subnet on this node yet"
    )]
    Missing { path: PathBuf },
    #[error("cannot read subnet file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write subnet file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("subnet file {path}, line {line}: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("subnet file {path} lacks {key}")]
    MissingKey { path: PathBuf, key: &'static str },
}

impl SubnetFile {
    /// The pods' gateway: the first host address of the subnet, carried by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// The VTEP's address: the subnet's network address, as flannel assigns it.
    pub fn vtep_addr(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    pub fn render(&self) -> String {
        format!(
            "OVERLAY_NETWORK={}\nOVERLAY_SUBNET={}/{}\nOVERLAY_MTU={}\nOVERLAY_IPMASQ={}\n",
            self.network,
            self.gateway(),
            self.subnet.prefix(),
            self.mtu,
            self.ip_masq
        )
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, SubnetFileError> {
        let invalid = |line: usize, problem: String| SubnetFileError::Invalid {
            path: path.to_path_buf(),
            line,
            problem,
        };
        let (mut network, mut subnet, mut mtu, mut ip_masq) = (None, None, None, None);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(invalid(
                    i + 1,
                    format!("expected KEY=value, found {line:?}"),
                ));
            };
            let value = value.trim().trim_matches('"');
            match key.trim() {
                "OVERLAY_NETWORK" => {
                    let n: Ipv4Network = value
                        .parse()
                        .map_err(|e| invalid(i + 1, format!("OVERLAY_NETWORK {value:?}: {e}")))?;
                    network =
                        Some(Ipv4Network::new(n.network(), n.prefix()).map_err(|e| {
                            invalid(i + 1, format!("OVERLAY_NETWORK {value:?}: {e}"))
                        })?);
                }
                "OVERLAY_SUBNET" => {
                    let n: Ipv4Network = value
                        .parse()
                        .map_err(|e| invalid(i + 1, format!("OVERLAY_SUBNET {value:?}: {e}")))?;
                    subnet =
                        Some(Ipv4Network::new(n.network(), n.prefix()).map_err(|e| {
                            invalid(i + 1, format!("OVERLAY_SUBNET {value:?}: {e}"))
                        })?);
                }
                "OVERLAY_MTU" => {
                    let m: u32 = value.parse().map_err(|_| {
                        invalid(i + 1, format!("OVERLAY_MTU {value:?} is not a number"))
                    })?;
                    if !(576..=65535).contains(&m) {
                        return Err(invalid(i + 1, format!("OVERLAY_MTU {m} is out of range")));
                    }
                    mtu = Some(m);
                }
                "OVERLAY_IPMASQ" => {
                    ip_masq = Some(match value {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(invalid(
                                i + 1,
                                format!("OVERLAY_IPMASQ {other:?} is not true or false"),
                            ))
                        }
                    })
                }
                // Newer daemons may add keys; an older plugin must keep working.
                _ => {}
            }
        }
        let missing = |key| SubnetFileError::MissingKey {
            path: path.to_path_buf(),
            key,
        };
        let file = SubnetFile {
            network: network.ok_or_else(|| missing("OVERLAY_NETWORK"))?,
            subnet: subnet.ok_or_else(|| missing("OVERLAY_SUBNET"))?,
            mtu: mtu.ok_or_else(|| missing("OVERLAY_MTU"))?,
            ip_masq: ip_masq.unwrap_or(true),
        };
        if file.subnet.prefix() > 30 {
            return Err(invalid(
                0,
                format!("OVERLAY_SUBNET {} leaves no room for pods", file.subnet),
            ));
        }
        Ok(file)
    }

    pub fn read(path: &Path) -> Result<Self, SubnetFileError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SubnetFileError::Missing {
                path: path.to_path_buf(),
            }),
            Err(source) => Err(SubnetFileError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes to a temp file in the same directory and renames it over the old one, so a plugin
    /// reading concurrently sees either the old file or the new one, never half of one.
    pub fn write_atomic(&self, path: &Path) -> Result<(), SubnetFileError> {
        let werr = |source| SubnetFileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(werr)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "subnet.env".into());
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    /// Removes the file; a file that is already gone is not an error.
    pub fn remove(path: &Path) -> Result<(), SubnetFileError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SubnetFileError::Write {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SubnetFile {
        SubnetFile {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.0/24".parse().unwrap(),
            mtu: 8951,
            ip_masq: true,
        }
    }

    #[test]
    fn renders_flannel_shape_with_gateway() {
        let text = sample().render();
        assert_eq!(
            text,
            "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=8951\nOVERLAY_IPMASQ=true\n"
        );
    }

    #[test]
    fn round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/overlayd/subnet.env");
        sample().write_atomic(&path).unwrap();
        assert_eq!(SubnetFile::read(&path).unwrap(), sample());
        // No temp file is left next to it.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn missing_file_says_overlayd_has_not_leased() {
        let err = SubnetFile::read(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(matches!(err, SubnetFileError::Missing { .. }));
        assert!(err.to_string().contains("has not leased a subnet"));
    }

    #[test]
    fn rejects_bad_values_with_the_key() {
        let p = Path::new("x");
        let err = SubnetFile::parse("OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=banana\n", p)
            .unwrap_err();
        assert!(err.to_string().contains("OVERLAY_SUBNET"), "{err}");
        let err = SubnetFile::parse(
            "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.1.1/24\n",
            p,
        )
        .unwrap_err();
        assert!(err.to_string().contains("OVERLAY_MTU"), "{err}");
    }
}
