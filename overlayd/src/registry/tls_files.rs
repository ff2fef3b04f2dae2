//! The TLS files for etcd (`--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`), read and
//! checked before any connection, so that a wrong file is named with what is wrong with it
//! instead of surfacing as a handshake failure: missing, not PEM, no private key, or a client
//! certificate outside its validity period.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use etcd_client::{Certificate, Identity, TlsOptions};

use super::client::RegistryError;
use crate::cli::EtcdArgs;

/// The TLS options for `args`, or `None` when no TLS file is given.
pub fn load(args: &EtcdArgs, endpoints: &str) -> Result<Option<TlsOptions>, RegistryError> {
    if args.etcd_cafile.is_none() && args.etcd_certfile.is_none() {
        return Ok(None);
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = &args.etcd_cafile {
        let pem = read(ca, endpoints)?;
        require(ca, endpoints, has_block(&pem, "CERTIFICATE"), "holds no PEM certificate (-----BEGIN CERTIFICATE-----); --etcd-cafile takes the CA that signed etcd's server certificate")?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    match (&args.etcd_certfile, &args.etcd_keyfile) {
        (Some(c), Some(k)) => {
            let cert = read(c, endpoints)?;
            require(
                c,
                endpoints,
                has_block(&cert, "CERTIFICATE"),
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            )?;
            if let Some(problem) = validity_problem(&cert, now_unix()) {
                return Err(content(c, endpoints, problem));
            }
            let key = read(k, endpoints)?;
            require(k, endpoints, has_block(&key, "PRIVATE KEY"), "holds no PEM private key (-----BEGIN PRIVATE KEY-----, EC PRIVATE KEY or RSA PRIVATE KEY); --etcd-keyfile takes the key of --etcd-certfile")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        (Some(c), None) => {
            return Err(content(
                c,
                endpoints,
                "is given without --etcd-keyfile; pass both".into(),
            ))
        }
        (None, Some(k)) => {
            return Err(content(
                k,
                endpoints,
                "is given without --etcd-certfile; pass both".into(),
            ))
        }
        (None, None) => {}
    }
    Ok(Some(tls))
}

fn read(path: &Path, endpoints: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|cause| RegistryError::TlsFile {
        path: path.display().to_string(),
        endpoints: endpoints.to_string(),
        cause,
    })
}

fn content(path: &Path, endpoints: &str, problem: String) -> RegistryError {
    RegistryError::TlsContent {
        path: path.display().to_string(),
        endpoints: endpoints.to_string(),
        problem,
    }
}

fn require(path: &Path, endpoints: &str, ok: bool, problem: &str) -> Result<(), RegistryError> {
    if ok {
        Ok(())
    } else {
        Err(content(path, endpoints, problem.to_string()))
    }
}

/// Whether `pem` has a `-----BEGIN ...<label>-----` block.
fn has_block(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What is wrong with the first certificate's validity period at `now`, if anything (a
/// certificate that cannot be parsed is left to the TLS library to judge).
fn validity_problem(pem: &[u8], now: i64) -> Option<String> {
    let der = first_block(pem, "CERTIFICATE")?;
    let (not_before, not_after) = validity(&der)?;
    let show = |t: i64| format!("{} UTC", civil_from_unix(t));
    if now > not_after {
        Some(format!(
            "the client certificate expired on {}; issue a new one (check with `openssl x509 \
             -noout -dates -in <file>`)",
            show(not_after)
        ))
    } else if now < not_before {
        Some(format!(
            "the client certificate is valid only from {} (is this node's clock right?)",
            show(not_before)
        ))
    } else {
        None
    }
}

/// The DER of the first PEM block labelled `label`.
fn first_block(pem: &[u8], label: &str) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    base64_decode(&text[start..stop])
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// One DER element at the start of `d`: (tag, contents, rest).
fn der(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, mut d) = d.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        d = &d[n..];
        len
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// notBefore and notAfter of an X.509 certificate, as Unix seconds.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = der(cert)?; // Certificate SEQUENCE
    let (_, mut tbs, _) = der(cert)?; // TBSCertificate SEQUENCE
    let (tag, _, rest) = der(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // [0] version
    }
    let (_, _, rest) = der(tbs)?; // serialNumber
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, _, rest) = der(rest)?; // issuer
    let (_, validity, _) = der(rest)?;
    let (t1, nb, rest) = der(validity)?;
    let (t2, na, _) = der(rest)?;
    Some((asn1_time(t1, nb)?, asn1_time(t2, na)?))
}

/// UTCTime (tag 0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ).
fn asn1_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let days = days_from_civil(year, n(0)?, n(2)?);
    Some(days * 86_400 + n(4)? * 3600 + n(6)? * 60 + n(8)?)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// "2026-11-30 10:11:58" for Unix seconds `t`.
fn civil_from_unix(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_unix(0), "1970-01-01 00:00:00");
        assert_eq!(asn1_time(0x17, b"261130101158Z"), Some(1_796_033_518));
        assert_eq!(civil_from_unix(1_796_033_518), "2026-11-30 10:11:58");
        assert_eq!(asn1_time(0x18, b"20261130101158Z"), Some(1_796_033_518));
    }

    #[test]
    fn pem_blocks_are_recognised_by_label() {
        assert!(has_block(
            b"-----BEGIN EC PRIVATE KEY-----\nAA==\n",
            "PRIVATE KEY"
        ));
        assert!(!has_block(b"this is no key\n", "PRIVATE KEY"));
        assert_eq!(base64_decode("TWFu"), Some(b"Man".to_vec()));
    }
}
