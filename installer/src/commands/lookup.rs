//! `lookup`: how the tables in force decide each address (the datapath's own search,
//! read-only), and which attachments a denied one is dropped by.
use anyhow::{Context, Result};
use clap::Args;
use egress_deny_datapath::{
    counters::CounterMap,
    paths::{PinLayout, StateLayout},
    rules::RuleTables,
};

use crate::{attachments::attachments, cli::StateArgs};

#[derive(Args, Debug)]
pub struct LookupArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Addresses to decide, IPv4 or IPv6.
    #[arg(required = true)]
    pub addresses: Vec<std::net::IpAddr>,
}

pub fn run(args: &LookupArgs) -> Result<()> {
    let layout = PinLayout::new(&args.state.pin_dir);
    let tables = RuleTables::open(&layout)
        .and_then(|t| t.snapshot())
        .context("opening the rule tables")?;
    let state = StateLayout::new(&args.state.state_dir);
    let live = attachments(&layout, &state);
    let counters = CounterMap::open(&layout).ok();
    // An older datapath has no settings map: no NAT64 prefixes then.
    let nat64 = egress_deny_datapath::settings::read(&layout)
        .map(|s| s.nat64_prefixes)
        .unwrap_or_default();
    for addr in &args.addresses {
        let d = tables.decide(*addr, &nat64)?;
        let prefix = d
            .prefix
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{addr} {} {prefix}", d.action.as_str());
        if let Some((nat64_prefix, embedded)) = d.via_nat64 {
            println!(
                "  IPv4 rule: {addr} is {embedded} through the NAT64 prefix {nat64_prefix} (--nat64-prefixes)"
            );
        }
        if d.action == egress_deny_datapath::rules::Action::Deny {
            println!("  dropped by every attachment ({}):", live.len());
            for a in &live {
                let c = counters
                    .as_ref()
                    .and_then(|m| m.get(a.ifindex).ok())
                    .unwrap_or_default();
                println!("    {a}: denied {} packets so far", c.denied_packets);
            }
        }
    }
    Ok(())
}
