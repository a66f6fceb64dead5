//! The kernel's canonical form of a rule (module docs of [`super`], "Kernel
//! canonicalisations"): what `iptables-save` prints for a rule Neutron wrote. sg compares live
//! and rendered rules in this form, so its apply converges where Neutron's own diff does not.

use crate::model::addr;

/// Splits a rule into iptables-save tokens; a double-quoted comment is one token.
pub fn tokens(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in rule.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(ch),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The rule as the kernel lists it, with MAC addresses upper-cased on both sides (the back
/// ends differ, Neutron compares that way).
pub fn kernel_form(rule: &str) -> String {
    let toks = tokens(rule);
    let mut out: Vec<String> = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i].as_str();
        let next = toks.get(i + 1).map(String::as_str);
        match (t, next) {
            ("-s" | "-d", Some(v)) => {
                match addr::parse_network(v) {
                    Some(n) if n.prefix_len() == 0 => {}
                    Some(n) => {
                        out.push(t.to_string());
                        out.push(addr::net_to_string(n.trunc()));
                    }
                    None => {
                        out.push(t.to_string());
                        out.push(v.to_string());
                    }
                }
                i += 2;
            }
            ("-p", Some("ip" | "hopopt" | "0" | "all")) => i += 2,
            ("--mac-source", Some(v)) => {
                out.push(t.to_string());
                out.push(v.to_ascii_uppercase());
                i += 2;
            }
            ("--icmp-type", Some(v)) if v == "255" || v.starts_with("255/") => {
                out.push(t.to_string());
                out.push("any".to_string());
                i += 2;
            }
            _ => {
                out.push(t.to_string());
                i += 1;
            }
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::kernel_form;

    #[test]
    fn canonicalisations() {
        assert_eq!(
            kernel_form("-s 10.0.0.5/24 -p tcp -m tcp --dport 22 -j RETURN"),
            "-s 10.0.0.0/24 -p tcp -m tcp --dport 22 -j RETURN"
        );
        assert_eq!(
            kernel_form(
                "-s 0.0.0.0/0 -m mac --mac-source fa:16:3e:12:34:56 -m comment --comment \"Allow traffic from defined IP/MAC pairs.\" -j RETURN"
            ),
            "-m mac --mac-source FA:16:3E:12:34:56 -m comment --comment \"Allow traffic from defined IP/MAC pairs.\" -j RETURN"
        );
        assert_eq!(kernel_form("-p ip -j RETURN"), "-j RETURN");
        assert_eq!(
            kernel_form("-p icmp -m icmp --icmp-type 255/3 -j RETURN"),
            "-p icmp -m icmp --icmp-type any -j RETURN"
        );
        assert_eq!(
            kernel_form("-s 2001:DB8::1/64 -j RETURN"),
            "-s 2001:db8::/64 -j RETURN"
        );
    }
}
