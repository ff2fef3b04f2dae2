//! Whatever the plugin is given, it answers with a CNI error JSON carrying a code of the spec (or
//! one of its own, 100-103) or with a valid result, and never panics.
//!
//! Input layout: `CNI_*` variables as `KEY=value` lines, a NUL, the network config (stdin), a
//! NUL, the subnet file's text. A missing part is empty.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const CODES: [u64; 13] = [1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let env = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let stdin = parts.next().unwrap_or_default();
    let subnet = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = |k: &str| {
        vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        // What std::env::var gives for an empty variable: a value, which Env treats as unset.
    };
    let out = overlay_cni::request::preview(lookup, stdin, &subnet);
    if out.is_empty() {
        return; // a command that prints nothing on success (DEL, CHECK, GC, STATUS)
    }
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let version = v["cniVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no cniVersion: {out}"));
    assert!(
        overlay_cni::spec::SUPPORTED_VERSIONS.contains(&version),
        "cniVersion {version} in {out}"
    );
    if let Some(code) = v.get("code") {
        let code = code
            .as_u64()
            .unwrap_or_else(|| panic!("code not a number: {out}"));
        assert!(CODES.contains(&code), "code {code}: {out}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "no msg: {out}"
        );
    } else if v.get("supportedVersions").is_none() {
        // ADD's result: at least our three interfaces and one address.
        let ifaces = v["interfaces"]
            .as_array()
            .unwrap_or_else(|| panic!("{out}"));
        assert!(ifaces.len() >= 3, "{out}");
        assert!(v["ips"].as_array().is_some_and(|i| !i.is_empty()), "{out}");
    }
});
