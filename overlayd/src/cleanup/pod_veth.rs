//! The names aws-node gives pods' host-side veths: `<prefix><11 hex digits>` (the start of the sha1 of
//! `<namespace>.<pod>`), prefix `eni` unless `vethPrefix` (AWS_VPC_K8S_CNI_VETHPREFIX) in
//! `10-aws.conflist` says otherwise. Matching the whole shape, not just the prefix, keeps other
//! interfaces that happen to start with the same letters out.

/// aws-node's default prefix.
pub const DEFAULT_PREFIX: &str = "eni";
/// Hex digits after the prefix.
const HASH_LEN: usize = 11;
/// Prefixes aws-node refuses, because they would collide with the node's own interfaces.
const REFUSED: [&str; 3] = ["eth", "lo", "vlan"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethNames {
    prefix: String,
}

impl Default for VethNames {
    fn default() -> Self {
        VethNames {
            prefix: DEFAULT_PREFIX.to_string(),
        }
    }
}

impl VethNames {
    /// A prefix as aws-node accepts it (1 to 4 ASCII letters or digits, not eth/lo/vlan).
    pub fn new(prefix: &str) -> Result<Self, String> {
        let ok = (1..=4).contains(&prefix.len())
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric())
            && !REFUSED.contains(&prefix);
        if ok {
            Ok(VethNames {
                prefix: prefix.to_string(),
            })
        } else {
            Err(format!(
                "vethPrefix {prefix:?} is not one aws-node accepts (1-4 letters or digits, not eth, lo or vlan)"
            ))
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// True for `<prefix><11 lowercase hex digits>`.
    pub fn is_pod_veth(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix).is_some_and(|h| {
            h.len() == HASH_LEN && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
    }
}

/// The `vethPrefix` of the `aws-cni` plugin in a CNI config list, if it sets one.
pub fn prefix_in_conflist(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("plugins")?
        .as_array()?
        .iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("aws-cni"))?
        .get("vethPrefix")?
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_aws_node_names_only() {
        let v = VethNames::default();
        assert!(v.is_pod_veth("eni8ea2c11fe35"));
        assert!(!v.is_pod_veth("eni8ea2c11fe3"), "too short");
        assert!(!v.is_pod_veth("eni8ea2c11fe355"), "too long");
        assert!(!v.is_pod_veth("eni8EA2C11FE35"), "upper case");
        assert!(!v.is_pod_veth("eth0"));
        assert!(!v.is_pod_veth("enigma"));
        let custom = VethNames::new("abc").expect("valid");
        assert!(custom.is_pod_veth("abc0123456789a"));
        assert!(!custom.is_pod_veth("eni8ea2c11fe35"));
    }

    #[test]
    fn refuses_prefixes_aws_node_refuses() {
        for bad in ["", "eth", "lo", "vlan", "toolong", "a-b"] {
            assert!(VethNames::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_the_prefix_from_the_conflist() {
        let conf = r#"{"plugins":[{"type":"aws-cni","vethPrefix":"xyz"},{"type":"portmap"}]}"#;
        assert_eq!(prefix_in_conflist(conf).as_deref(), Some("xyz"));
        assert_eq!(
            prefix_in_conflist(r#"{"plugins":[{"type":"aws-cni"}]}"#),
            None
        );
        assert_eq!(prefix_in_conflist("not json"), None);
    }
}
