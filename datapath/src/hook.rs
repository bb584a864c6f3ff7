//! Which tc hook of an interface an attachment uses.
use aya::programs::TcAttachType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets entering the host from the device: pod veths (host side).
    Ingress,
    /// Packets leaving the host through the device: host uplinks.
    Egress,
}

impl Hook {
    pub(crate) fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}
