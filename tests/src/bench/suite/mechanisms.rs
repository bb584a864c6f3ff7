//! The filters compared, each loaded with the same rule list in the node namespace: none,
//! iptables (N DROP rules in FORWARD), ipset `hash:net` + one iptables rule (Calico's
//! mechanism), egress-deny (the installer's load path + the plugin's attach path) and the
//! reference tc LPM filter. How each is loaded (its set-up phases timed), switched off and
//! on between tests, and removed.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{SchedClassifierLinkId, TcAttachOptions},
};
use egress_deny_datapath::{
    attach::{self, AttachMode, AttachRequest, Hook},
    loader,
    netns::NetnsGuard,
    paths::PinLayout,
};

use super::{
    processes::{exec_in, pin_prefix},
    topology::{POD_VETH, Topology},
};

/// Every mechanism, in the report's table order.
pub const MECHANISMS: [&str; 5] = ["none", "iptables", "ipset", "egress-deny", "reference-lpm"];
/// The reference object's tc program.
pub const REFERENCE_PROGRAM: &str = "reference_lpm";

/// The iptables mechanism's rules live in their own chain, entered by one jump from
/// FORWARD, so that the filter can be switched off and on between tests without
/// reloading it (one rule at position 1 of FORWARD; deleting a rule by its
/// specification would make iptables-nft dump the whole table: minutes at 1M rules).
const IPT_CHAIN: &str = "EDBENCH";
const IPSET_NAME: &str = "edbench";
/// The ipset mechanism's one iptables rule, inserted at position 1 of FORWARD.
const IPSET_RULE_INSERT: [&str; 10] = [
    "-I",
    "FORWARD",
    "1",
    "-m",
    "set",
    "--match-set",
    IPSET_NAME,
    "dst",
    "-j",
    "DROP",
];

/// The rule list in each mechanism's input format, prepared before any timer starts
/// (generating text is not what is being measured).
pub struct Prepared {
    pub rules: Vec<(u32, u8)>,
    iptables: Arc<String>,
    ipset: Arc<String>,
}

fn cidr(addr: u32, len: u8) -> String {
    format!("{}/{len}", Ipv4Addr::from(addr))
}

impl Prepared {
    pub fn new(rules: Vec<(u32, u8)>, mechanisms: &[&str]) -> Self {
        let mut iptables = String::new();
        if mechanisms.contains(&"iptables") {
            iptables.reserve(rules.len() * 40 + 64);
            let _ = writeln!(iptables, "*filter\n:{IPT_CHAIN} - [0:0]");
            for (a, l) in &rules {
                let _ = writeln!(iptables, "-A {IPT_CHAIN} -d {} -j DROP", cidr(*a, *l));
            }
            let _ = writeln!(iptables, "-I FORWARD 1 -j {IPT_CHAIN}\nCOMMIT");
        }
        let mut ipset = String::new();
        if mechanisms.contains(&"ipset") {
            ipset.reserve(rules.len() * 26 + 128);
            let _ = writeln!(
                ipset,
                "create {IPSET_NAME} hash:net family inet hashsize 65536 maxelem {}",
                (rules.len() * 2).max(65536)
            );
            for (a, l) in &rules {
                let _ = writeln!(ipset, "add {IPSET_NAME} {}", cidr(*a, *l));
            }
        }
        Self {
            rules,
            iptables: Arc::new(iptables),
            ipset: Arc::new(ipset),
        }
    }
}

/// One mechanism loaded with a rule list. It can be switched off (its rules stay loaded)
/// and on again; `remove` unloads it.
pub enum Filter {
    None,
    Iptables,
    Ipset,
    EgressDeny(PinLayout),
    Reference(Box<aya::Ebpf>, Option<SchedClassifierLinkId>),
}

/// Set-up phases: (name, wall time).
pub type Phases = Vec<(&'static str, Duration)>;
/// The phases whose time grows with the rule count.
pub const SIZE_DEPENDENT: [&str; 3] = ["iptables-restore", "ipset restore", "rule inserts"];

/// Times consecutive set-up phases.
struct Laps {
    phases: Phases,
    since: Instant,
}

impl Laps {
    fn start() -> Self {
        Self {
            phases: Phases::new(),
            since: Instant::now(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        self.phases.push((name, self.since.elapsed()));
        self.since = Instant::now();
    }
}

/// Loads, switches and removes the mechanisms in one topology's node namespace.
pub struct Applier<'a> {
    pub topo: &'a Topology,
    pub prefix: &'a str,
    pub pins_made: usize,
    pub setup_budget: Duration,
}

fn ed_link_pin(layout: &PinLayout) -> PathBuf {
    layout.pod_link("bench", "eth0")
}

impl Applier<'_> {
    fn iptables(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-w"];
        full.extend_from_slice(args);
        exec_in(
            &self.topo.node.name,
            "iptables",
            &full,
            None,
            Duration::from_secs(120),
        )?
        .success()
        .map(drop)
    }

    /// Feeds a prepared rule set to `program` in the node namespace, which must finish
    /// within the set-up budget.
    fn restore(&self, program: &str, args: &[&str], input: &Arc<String>) -> Result<()> {
        exec_in(
            &self.topo.node.name,
            program,
            args,
            Some(input.clone()),
            self.setup_budget,
        )?
        .success()
        .map(drop)
    }

    fn ed_attach(&self, layout: &PinLayout) -> Result<()> {
        let _guard = NetnsGuard::enter(&self.topo.node.path())?;
        let link_pin = ed_link_pin(layout);
        attach::attach(
            layout,
            &AttachRequest {
                ifname: POD_VETH,
                hook: Hook::Ingress,
                link_pin: &link_pin,
                mode: AttachMode::Tcx,
                exempt: false,
            },
        )?;
        Ok(())
    }

    fn ref_attach(&self, ebpf: &mut aya::Ebpf) -> Result<SchedClassifierLinkId> {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(REFERENCE_PROGRAM)
            .context("program")?
            .try_into()?;
        let _guard = NetnsGuard::enter(&self.topo.node.path())?;
        Ok(prog.attach_with_options(
            POD_VETH,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )?)
    }

    /// Loads the rule set and switches the filter on. What failed half-way is removed.
    pub fn apply(&mut self, mechanism: &str, p: &Prepared) -> Result<(Filter, Phases)> {
        let mut laps = Laps::start();
        let filter = match mechanism {
            "none" => Filter::None,
            "iptables" => Filter::Iptables,
            "ipset" => Filter::Ipset,
            "egress-deny" => {
                self.pins_made += 1;
                Filter::EgressDeny(PinLayout::new(format!(
                    "/sys/fs/bpf/{}{}",
                    pin_prefix(self.prefix),
                    self.pins_made
                )))
            }
            // Lives in this process: dropped on failure, aya unloads it.
            "reference-lpm" => {
                let filter = self.load_reference(&p.rules, &mut laps)?;
                return Ok((filter, laps.phases));
            }
            other => bail!("unknown mechanism {other}"),
        };
        match self.load(&filter, p, &mut laps) {
            Ok(()) => Ok((filter, laps.phases)),
            Err(e) => {
                self.remove(filter);
                Err(e)
            }
        }
    }

    fn load(&self, filter: &Filter, p: &Prepared, laps: &mut Laps) -> Result<()> {
        match filter {
            Filter::None | Filter::Reference(..) => {}
            Filter::Iptables => {
                // One transaction: the chain with its N rules and the jump to it.
                self.restore("iptables-restore", &["-w", "--noflush"], &p.iptables)?;
                laps.lap("iptables-restore");
            }
            Filter::Ipset => {
                self.restore("ipset", &["restore"], &p.ipset)?;
                laps.lap("ipset restore");
                self.iptables(&IPSET_RULE_INSERT)?;
                laps.lap("iptables rule");
            }
            Filter::EgressDeny(layout) => {
                // The installer's load path: program and maps loaded and pinned, then
                // the rules compiled into a table and swapped in, then the plugin's ADD:
                // TCX on tc ingress of the pod's host-side veth.
                loader::load_and_pin(layout).context("load_and_pin")?;
                egress_deny_datapath::events::mark_rules_loaded(layout)?;
                laps.lap("load_and_pin");
                crate::bench::deny_v4(layout, &p.rules)?;
                laps.lap("rule inserts");
                self.ed_attach(layout)?;
                laps.lap("attach (TCX)");
            }
        }
        Ok(())
    }

    fn load_reference(&self, rules: &[(u32, u8)], laps: &mut Laps) -> Result<Filter> {
        let mut ebpf = aya::EbpfLoader::new().load(egress_deny_datapath::REFERENCE_LPM_OBJECT)?;
        {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(REFERENCE_PROGRAM)
                .context("program")?
                .try_into()?;
            prog.load()?;
        }
        laps.lap("load");
        {
            let mut trie: aya::maps::lpm_trie::LpmTrie<_, [u8; 4], u32> =
                aya::maps::lpm_trie::LpmTrie::try_from(ebpf.map_mut("ref_v4").context("ref_v4")?)?;
            for (a, l) in rules {
                trie.insert(
                    &aya::maps::lpm_trie::Key::new(u32::from(*l), a.to_be_bytes()),
                    1,
                    0,
                )?;
            }
        }
        laps.lap("rule inserts");
        let link = self.ref_attach(&mut ebpf)?;
        laps.lap("attach (TCX)");
        Ok(Filter::Reference(Box::new(ebpf), Some(link)))
    }

    /// Switches a loaded filter on or off (at most one is on at a time: the FORWARD
    /// chain then holds at most one rule, at position 1).
    pub fn set_enabled(&self, filter: &mut Filter, on: bool) -> Result<()> {
        match filter {
            Filter::None => Ok(()),
            Filter::Iptables if on => self.iptables(&["-I", "FORWARD", "1", "-j", IPT_CHAIN]),
            Filter::Ipset if on => self.iptables(&IPSET_RULE_INSERT),
            Filter::Iptables | Filter::Ipset => self.iptables(&["-D", "FORWARD", "1"]),
            Filter::EgressDeny(layout) if on => self.ed_attach(layout),
            Filter::EgressDeny(layout) => Ok(attach::detach(
                Some(POD_VETH),
                Hook::Ingress,
                &ed_link_pin(layout),
                AttachMode::Tcx,
            )?),
            Filter::Reference(ebpf, link) => {
                if on {
                    if link.is_none() {
                        *link = Some(self.ref_attach(ebpf)?);
                    }
                } else if let Some(id) = link.take() {
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut(REFERENCE_PROGRAM)
                        .context("program")?
                        .try_into()?;
                    prog.detach(id)?;
                }
                Ok(())
            }
        }
    }

    pub fn remove(&self, filter: Filter) {
        let node = &self.topo.node.name;
        let long = Duration::from_secs(600);
        match filter {
            Filter::Iptables => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
                let _ = exec_in(node, "iptables", &["-w", "-F", IPT_CHAIN], None, long);
                let _ = exec_in(node, "iptables", &["-w", "-X", IPT_CHAIN], None, long);
            }
            Filter::Ipset => {
                let _ = exec_in(node, "iptables", &["-w", "-F", "FORWARD"], None, long);
                let _ = exec_in(node, "ipset", &["destroy", IPSET_NAME], None, long);
            }
            // Removing the pins drops the link (detach) and the last map references.
            Filter::EgressDeny(layout) => {
                let _ = loader::unpin_all(&layout);
            }
            Filter::Reference(ebpf, _) => drop(ebpf), // aya detaches its links on drop
            Filter::None => {}
        }
    }
}
