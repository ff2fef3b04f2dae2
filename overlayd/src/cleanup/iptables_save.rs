//! The `iptables-save` text format, read back: tables, their chains and their rules, with each rule's
//! arguments split the way `iptables-restore` splits them (double quotes, backslash escapes).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SaveFormatError {
    #[error("line {line}: {what}: {text:?}")]
    Malformed {
        line: usize,
        what: &'static str,
        text: String,
    },
}

/// One table of an `iptables-save` dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// Chains in the order they were declared (built-in and user-defined).
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// One `-A <chain> <spec>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// The rule as written after `-A <chain> `, verbatim (quotes kept), ready for `-D <chain> <spec>`.
    pub spec: String,
    /// `spec` split into arguments, quotes removed.
    pub args: Vec<String>,
}

impl SavedRule {
    /// The value of `--comment`, if the rule has one.
    pub fn comment(&self) -> Option<&str> {
        self.value_of("--comment")
    }

    /// The jump target (`-j`/`--jump`), if any.
    pub fn target(&self) -> Option<&str> {
        self.value_of("-j").or_else(|| self.value_of("--jump"))
    }

    fn value_of(&self, flag: &str) -> Option<&str> {
        self.args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
    }

    /// The line as `iptables-save` prints it.
    pub fn to_save_line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }
}

/// Parses a whole `iptables-save` dump (any number of tables).
pub fn parse(text: &str) -> Result<Vec<SavedTable>, SaveFormatError> {
    let mut tables = Vec::new();
    let mut current: Option<SavedTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = |what| SaveFormatError::Malformed {
            line: line_no,
            what,
            text: line.to_string(),
        };
        if let Some(name) = line.strip_prefix('*') {
            if current.is_some() {
                return Err(malformed("table starts before the previous COMMIT"));
            }
            current = Some(SavedTable {
                name: name.to_string(),
                ..SavedTable::default()
            });
        } else if line == "COMMIT" {
            match current.take() {
                Some(t) => tables.push(t),
                None => return Err(malformed("COMMIT outside a table")),
            }
        } else if let Some(decl) = line.strip_prefix(':') {
            let table = current
                .as_mut()
                .ok_or_else(|| malformed("chain outside a table"))?;
            let name = decl
                .split_whitespace()
                .next()
                .ok_or_else(|| malformed("chain without a name"))?;
            table.chains.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let table = current
                .as_mut()
                .ok_or_else(|| malformed("rule outside a table"))?;
            let (chain, spec) = match rest.split_once(' ') {
                Some((c, s)) => (c, s.trim()),
                None => (rest, ""),
            };
            let args = split_args(spec).ok_or_else(|| malformed("unbalanced quotes"))?;
            table.rules.push(SavedRule {
                chain: chain.to_string(),
                spec: spec.to_string(),
                args,
            });
        } else {
            return Err(malformed("unexpected line"));
        }
    }
    if current.is_some() {
        return Err(SaveFormatError::Malformed {
            line: text.lines().count(),
            what: "table without COMMIT",
            text: String::new(),
        });
    }
    Ok(tables)
}

/// Splits a rule spec into arguments like `iptables-restore` does: whitespace separates, double quotes
/// group, a backslash escapes the next character. `None` when a quote is left open.
pub fn split_args(spec: &str) -> Option<Vec<String>> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(chars.next().unwrap_or('\\'));
                in_arg = true;
            }
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                cur.push(c);
                in_arg = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if in_arg {
        args.push(cur);
    }
    Some(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:AWS-SNAT-CHAIN-0 - [0:0]
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 192.168.10.20 --random-fully
COMMIT
# Completed
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -i eth0 -j MARK --set-xmark 0x1/0x1
COMMIT
"#;

    #[test]
    fn parses_tables_chains_and_rules() {
        let tables = parse(DUMP).expect("parse");
        assert_eq!(tables.len(), 2);
        let nat = &tables[0];
        assert_eq!(nat.name, "nat");
        assert_eq!(
            nat.chains,
            ["PREROUTING", "POSTROUTING", "AWS-SNAT-CHAIN-0"]
        );
        assert_eq!(nat.rules.len(), 3);
        assert_eq!(nat.rules[0].comment(), Some("AWS, CONNMARK"));
        assert_eq!(nat.rules[0].target(), Some("CONNMARK"));
        assert_eq!(nat.rules[1].target(), Some("AWS-SNAT-CHAIN-0"));
        assert_eq!(
            nat.rules[1].to_save_line(),
            r#"-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0"#
        );
        assert_eq!(tables[1].rules[0].comment(), None);
    }

    #[test]
    fn splits_quotes_and_escapes() {
        assert_eq!(
            split_args(r#"-m comment --comment "a \"b\" c" -j X"#).expect("split"),
            ["-m", "comment", "--comment", r#"a "b" c"#, "-j", "X"]
        );
        assert_eq!(split_args(r#"--comment "open"#), None);
        assert_eq!(split_args("  "), Some(vec![]));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("*nat\nCOMMIT\n").is_ok());
        assert!(parse("*nat\n-A\nCOMMIT\n").is_err());
        assert!(parse("-A X y\n").is_err());
        assert!(parse("*nat\n:X - [0:0]\n").is_err());
        assert!(parse("*nat\nbogus\nCOMMIT\n").is_err());
    }
}
