//! Inspecting what ztunnel's capture leaves in a node namespace: the nftables table
//! `inet ztunnel`, the `ip rule fwmark 0x400/0xfff lookup 100` policy rule and the routes of
//! table 100 (see `ztunnel capture install|remove` and shared/TPROXY.md).

use crate::netns::Netns;
use anyhow::Result;

/// The TPROXY policy rule, as `ip -4 rule show` prints it.
pub const FWMARK_RULE: &str = "fwmark 0x400/0xfff lookup 100";
/// The routing table of the TPROXY mark.
pub const ROUTE_TABLE: &str = "100";

/// The capture state of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureState {
    /// Lines of `nft list tables` that name the `inet ztunnel` table.
    pub ztunnel_tables: usize,
    /// `nft list table inet ztunnel`, when the table exists.
    pub ruleset: Option<String>,
    /// How many `ip -4 rule` lines are the TPROXY fwmark rule.
    pub fwmark_rules: usize,
    /// `ip -4 route show table 100`, one entry per route.
    pub table_routes: Vec<String>,
}

impl CaptureState {
    /// Reads the state of `ns`.
    pub fn read(ns: &Netns) -> Result<CaptureState> {
        let tables = ns.exec(&["nft", "list", "tables"])?;
        let ztunnel_tables = tables
            .lines()
            .filter(|l| l.trim() == "table inet ztunnel")
            .count();
        let listing = ns.exec_output(&["nft", "list", "table", "inet", "ztunnel"])?;
        let ruleset = listing
            .status
            .success()
            .then(|| String::from_utf8_lossy(&listing.stdout).into_owned());
        let fwmark_rules = ns
            .ip(&["-4", "rule", "show"])?
            .lines()
            .filter(|l| l.contains(FWMARK_RULE))
            .count();
        // An empty table is "no such table" for some iproute2 versions: not an error here.
        let routes = ns.exec_output(&["ip", "-4", "route", "show", "table", ROUTE_TABLE])?;
        let table_routes = String::from_utf8_lossy(&routes.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        Ok(CaptureState {
            ztunnel_tables,
            ruleset,
            fwmark_rules,
            table_routes,
        })
    }

    /// True when the namespace holds no trace of the capture.
    pub fn is_clean(&self) -> bool {
        self.ztunnel_tables == 0
            && self.ruleset.is_none()
            && self.fwmark_rules == 0
            && self.table_routes.is_empty()
    }

    /// True when exactly one copy of every piece is installed.
    pub fn is_installed_once(&self) -> bool {
        self.ztunnel_tables == 1
            && self.ruleset.is_some()
            && self.fwmark_rules == 1
            && self.table_routes.len() == 1
            && self.table_routes[0].starts_with("local default dev lo")
    }

    /// How many times `needle` occurs in the ruleset (0 without a table).
    pub fn count_in_ruleset(&self, needle: &str) -> usize {
        self.ruleset
            .as_deref()
            .map_or(0, |r| r.matches(needle).count())
    }
}
