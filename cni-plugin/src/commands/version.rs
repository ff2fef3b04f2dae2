//! VERSION: which spec versions this plugin speaks.

use serde_json::json;

use crate::spec::{LATEST, SUPPORTED_VERSIONS};

pub fn version(requested: Option<&str>) -> String {
    let v = requested
        .filter(|r| SUPPORTED_VERSIONS.contains(r))
        .unwrap_or(LATEST);
    json!({"cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}
