//! Following interfaces over rtnetlink: a dump of every interface (name, ifindex, bridge), and
//! each change as it happens (created, changed, deleted, renamed, moved away).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup, new_multicast_connection};

use crate::netns;

type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, netlink_sys::SocketAddr)>;

/// One interface as the taps thread needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    /// The bridge (or other master) it is a port of.
    pub master: Option<u32>,
}

/// One rtnetlink link event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// Created, or changed (renamed, enslaved, up/down): the interface as it is now.
    New {
        name: String,
        link: Link,
    },
    Deleted {
        ifindex: u32,
    },
    /// The socket's buffer overflowed and events were lost: read the whole table again.
    Overrun,
}

pub struct Links {
    handle: Handle,
    events: Events,
}

impl Links {
    /// Opens a netlink connection subscribed to link events in netns `ns` (or the current
    /// one). The socket is created inside the namespace and stays bound to it. Must be called
    /// from within a tokio runtime.
    pub fn open(ns: Option<&str>) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, events) = netns::run_in(ns, move || {
            let _guard = rt.enter();
            new_multicast_connection(&[MulticastGroup::Link])
        })?
        .context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle, events })
    }

    /// Every interface: name → ifindex and master.
    pub async fn dump(&self) -> Result<BTreeMap<String, Link>> {
        let mut out = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await.context("rtnetlink link dump")? {
            if let Some((name, link)) = describe(&msg) {
                out.insert(name, link);
            }
        }
        Ok(out)
    }

    /// The next link event; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<LinkChange> {
        loop {
            let (msg, _) = self.events.next().await?;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    if let Some((name, link)) = describe(&l) {
                        return Some(LinkChange::New { name, link });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    return Some(LinkChange::Deleted {
                        ifindex: l.header.index,
                    });
                }
                NetlinkPayload::Overrun(_) => return Some(LinkChange::Overrun),
                _ => {}
            }
        }
    }

    /// The events already queued, without waiting.
    pub fn queued(&mut self) -> Vec<LinkChange> {
        let mut out = Vec::new();
        while let Ok(Some((msg, _))) = self.events.try_recv().map(Some) {
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    if let Some((name, link)) = describe(&l) {
                        out.push(LinkChange::New { name, link });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    out.push(LinkChange::Deleted {
                        ifindex: l.header.index,
                    });
                }
                NetlinkPayload::Overrun(_) => out.push(LinkChange::Overrun),
                _ => {}
            }
        }
        out
    }
}

fn describe(msg: &LinkMessage) -> Option<(String, Link)> {
    let mut name = None;
    let mut master = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Controller(m) if *m != 0 => master = Some(*m),
            _ => {}
        }
    }
    Some((
        name?,
        Link {
            ifindex: msg.header.index,
            master,
        },
    ))
}
