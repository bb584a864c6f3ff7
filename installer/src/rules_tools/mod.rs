//! The work behind `egress-deny-installer rules …` (`commands/rules.rs`): offline tools
//! around the rule lists, on the daemon's own parser (same formats, same errors).
pub mod check;
pub mod configmaps;
