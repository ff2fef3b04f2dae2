//! Runs a CNI conflist the way a runtime does (libcni's rules, CNI spec 1.0 "Network
//! configuration lists"): ADD calls each plugin in order, each one's stdin being the plugin's
//! config plus the list's `cniVersion` and `name`, the previous plugin's result as `prevResult`,
//! and `runtimeConfig` holding only the capabilities the plugin declares; DEL calls them in
//! reverse order with the cached ADD result as `prevResult`. Plugins are found in `CNI_PATH`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{json, Map, Value};

use crate::netns::Netns;

pub struct Invocation<'a> {
    /// Where the runtime runs (the node's namespace).
    pub node: &'a Netns,
    pub pod: &'a Netns,
    pub container_id: &'a str,
    pub ifname: &'a str,
    /// Directories searched for plugin binaries, in order.
    pub cni_path: Vec<PathBuf>,
    /// What the runtime offers, by capability (e.g. `{"portMappings": [...]}`).
    pub runtime_config: Value,
}

impl Invocation<'_> {
    fn find(&self, plugin_type: &str) -> Result<PathBuf, String> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.exists())
            .ok_or_else(|| format!("plugin {plugin_type:?} not found in {:?}", self.cni_path))
    }

    fn stdin(&self, list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("cniVersion".into(), list["cniVersion"].clone());
        conf.insert("name".into(), list["name"].clone());
        let caps = plugin["capabilities"].as_object();
        let rc: Map<String, Value> = self
            .runtime_config
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        caps.is_some_and(|c| c.get(*k).and_then(Value::as_bool) == Some(true))
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        Value::Object(conf)
    }

    fn call(&self, command: &str, conf: &Value) -> Result<Value, String> {
        let plugin_type = conf["type"].as_str().ok_or("plugin without type")?;
        let exe = self.find(plugin_type)?;
        let path = std::env::join_paths(&self.cni_path).map_err(|e| e.to_string())?;
        let mut child = self
            .node
            .cmd(exe.to_str().ok_or("non-UTF-8 plugin path")?)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.pod.path())
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{plugin_type} {command} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| format!("{plugin_type}: {e}: {stdout}"))
    }

    /// ADD through the whole list; returns the last plugin's result (what the runtime caches).
    pub fn add(&self, list: &Value) -> Result<Value, String> {
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"]
            .as_array()
            .ok_or("conflist without plugins")?
        {
            let conf = self.stdin(list, plugin, prev.as_ref());
            let result = self.call("ADD", &conf)?;
            // A plugin that prints nothing passes the previous result on.
            if !result.is_null() {
                prev = Some(result);
            }
        }
        prev.ok_or_else(|| "the chain returned no result".to_string())
    }

    /// DEL through the list in reverse, each with the cached ADD result.
    pub fn del(&self, list: &Value, cached: Option<&Value>) -> Result<(), String> {
        for plugin in list["plugins"]
            .as_array()
            .ok_or("conflist without plugins")?
            .iter()
            .rev()
        {
            let conf = self.stdin(list, plugin, cached);
            self.call("DEL", &conf)?;
        }
        Ok(())
    }
}

/// A conflist of `plugins` named like the lab's network.
pub fn conflist(plugins: Vec<Value>) -> Value {
    json!({ "cniVersion": "1.0.0", "name": "lab", "plugins": plugins })
}

/// Debian's reference plugins (containernetworking-plugins).
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";
