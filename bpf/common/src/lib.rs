//! Types shared by the egress-deny eBPF program and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the eBPF program
//! and userspace agree on the byte layout without relying on compiler padding.
#![no_std]

/// Maximum rules per address family. LPM tries allocate per element (no prealloc), so
/// this is a ceiling, not a reservation; it must stay above 10,000,000.
pub const MAX_RULES_PER_FAMILY: u32 = 1 << 24;

/// Maximum number of attachments (pod veths + host interfaces) with live counters.
pub const MAX_ATTACHMENTS: u32 = 1 << 16;

/// Verdict stored for a prefix in the rule tries.
pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;

/// Value of an LPM-trie entry: the action for destinations whose longest matching prefix
/// is this entry. Allow entries are the `!CIDR` exceptions of the rule format. The entry's
/// own prefix length is repeated here because a kernel LPM lookup returns only the value,
/// and `lookup`/deny events want to name the deciding prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub action: u8,
    pub prefix_len: u8,
    pub _pad: [u8; 2],
}

impl RuleValue {
    pub const fn deny(prefix_len: u8) -> Self {
        Self {
            action: ACTION_DENY,
            prefix_len,
            _pad: [0; 2],
        }
    }

    pub const fn allow(prefix_len: u8) -> Self {
        Self {
            action: ACTION_ALLOW,
            prefix_len,
            _pad: [0; 2],
        }
    }

    pub const fn is_deny(&self) -> bool {
        self.action == ACTION_DENY
    }
}

/// Key of the per-CPU counter map: the interface the program runs on. Pod attachments
/// are host-side veths (tc ingress), host attachments are uplinks (tc egress); both live
/// in the host network namespace, so the ifindex identifies the attachment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
}

/// Per-CPU packet/byte counters of one attachment, plus the per-CPU state of its
/// deny-event rate limit (kept here because the deny path already holds this entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
    /// Start (bpf_ktime_get_ns) of the current one-second event window.
    pub events_window_start_ns: u64,
    /// Deny events emitted in the current window.
    pub events_in_window: u32,
    /// Deny events not emitted: over the rate limit, or the ring buffer was full.
    pub events_suppressed: u32,
    /// Host interfaces: forwarded packets passed without a lookup because a pod veth
    /// already judged (or exempted) them (`Settings::judged_mark`).
    pub judged_before_packets: u64,
}

impl Counters {
    /// Adds another CPU's (or attachment's) counters to this one.
    pub fn add(&mut self, other: &Counters) {
        self.allowed_packets += other.allowed_packets;
        self.allowed_bytes += other.allowed_bytes;
        self.denied_packets += other.denied_packets;
        self.denied_bytes += other.denied_bytes;
        self.events_suppressed = self.events_suppressed.wrapping_add(other.events_suppressed);
        self.judged_before_packets += other.judged_before_packets;
    }
}

/// Size of the deny-event ring buffer (a power of two multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Single-entry array: the datapath's runtime settings, written by the installer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Deny events per second per attachment and CPU; 0 turns events off.
    pub events_per_second: u32,
    /// `CONFIG_RULES_LOADED`, …: state userspace shares through the pinned map.
    pub flags: u32,
}

/// Set by the installer once a valid rule set is enforced in these maps. The plugin
/// does not attach (pods are retried) before that: an empty map after a node reboot
/// must not look like "nothing is denied".
pub const CONFIG_RULES_LOADED: u32 = 1;

/// NAT64 prefixes (/96) whose embedded IPv4 address the IPv4 rules judge.
pub const MAX_NAT64_PREFIXES: usize = 4;

/// Single-entry array: how attachments cooperate, written by the installer at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `skb->mark` bit(s) a pod veth's program sets on every packet it allowed (or
    /// exempted); a host interface's program passes forwarded packets carrying them
    /// without a second lookup. 0: off (every packet is judged wherever it passes).
    pub judged_mark: u32,
    /// The mark a filtered pod's veth sets on what it allowed: `judged_mark` when pod
    /// verdicts are trusted (`--trust-pod-verdicts`), else 0. Off by default: a
    /// destination rewritten after the pod's veth (a Service DNAT'ed to an endpoint
    /// outside the node) would not be judged again.
    pub pod_mark: u32,
    /// How many of `nat64_prefixes` are in use.
    pub nat64_prefix_count: u32,
    /// The first 12 bytes (a /96) of each NAT64 prefix.
    pub nat64_prefixes: [[u8; 12]; MAX_NAT64_PREFIXES],
    pub _pad: u32,
}

/// `DenyEvent::family` for an IP packet whose destination could not be read.
pub const FAMILY_UNREADABLE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// An IPv6 destination in a NAT64 prefix, denied by the IPv4 rule (`prefix_len`) that
/// decides its embedded IPv4 address (the last four bytes of `daddr`).
pub const FAMILY_NAT64: u8 = 64;

/// One denied packet, reported through the ring buffer (rate-limited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    pub timestamp_ns: u64,
    /// Attachment (interface) that dropped it.
    pub ifindex: u32,
    pub packet_len: u32,
    /// FAMILY_V4, FAMILY_V6 or FAMILY_UNREADABLE.
    pub family: u8,
    /// Prefix length of the deny rule that matched (the rule is `daddr/prefix_len`).
    pub prefix_len: u8,
    pub _pad: [u8; 6],
    /// Destination; IPv4 in the first four bytes.
    pub daddr: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no implicit padding.
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::DenyEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleValue>(), 4);
        assert_eq!(size_of::<CounterKey>(), 4);
        assert_eq!(size_of::<Counters>(), 56);
        assert_eq!(size_of::<Settings>(), 64);
        assert_eq!(size_of::<DatapathConfig>(), 8);
        assert_eq!(size_of::<DenyEvent>(), 40);
    }
}
