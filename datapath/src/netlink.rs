//! The rtnetlink requests aya does not offer: a link's kind and peer (to find a pod's
//! host-side veth from inside the pod's namespace), namespace ids, the clsact qdisc and
//! cls_bpf filters (netlink-mode attachments and their CHECK), and notifications of
//! link and tc changes. A socket belongs to the namespace of the thread that created it.
mod link;
mod tc;
mod watch;
mod wire;

pub use link::{LinkDetails, link_details, netns_id};
pub use tc::{BpfFilter, add_clsact, bpf_filter_program_ids, bpf_filters, replace_bpf_filter};
pub use watch::ChangeWatch;

#[cfg(test)]
mod tests;
