//! Key names under the prefix.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let trimmed = prefix.trim_end_matches('/');
        let prefix = if trimmed.starts_with('/') {
            trimmed.to_string()
        } else {
            format!("/{trimmed}")
        };
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets/` — with the trailing slash, so `/net` never matches `/network`.
    pub fn subnets(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// `<prefix>/subnets/10.244.7.0-24`
    pub fn subnet(&self, subnet: &Ipv4Network) -> String {
        format!("{}{}-{}", self.subnets(), subnet.network(), subnet.prefix())
    }

    /// The subnet a key names, or `None` for a key that is not a subnet key.
    pub fn parse_subnet(&self, key: &[u8]) -> Option<Ipv4Network> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.subnets())?;
        let (ip, len) = rest.split_once('-')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let net = Ipv4Network::new(ip, len).ok()?;
        (net.network() == ip).then_some(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_key_names() {
        let k = Keys::new("/coreos.com/network/");
        assert_eq!(k.config(), "/coreos.com/network/config");
        let s: Ipv4Network = "10.244.7.0/24".parse().unwrap();
        assert_eq!(k.subnet(&s), "/coreos.com/network/subnets/10.244.7.0-24");
        assert_eq!(k.parse_subnet(k.subnet(&s).as_bytes()), Some(s));
        assert_eq!(
            k.parse_subnet(b"/coreos.com/network/subnets/10.244.7.1-24"),
            None
        );
        assert_eq!(k.parse_subnet(b"/coreos.com/network/config"), None);
        assert_eq!(Keys::new("net").config(), "/net/config");
    }
}
