//! A TCP relay between NATS clients and a nats-server that can lose a reply on purpose: the
//! connection on which a client sends a given subject goes dark the moment that message is
//! passed on. The server still gets it (and whatever the client sends after), the client gets
//! nothing more on that connection: not the reply, not JetStream's answers. This is the lost
//! reply of a real network, placed at an exact point, which no fixed sleep or kill can do.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[derive(Clone)]
pub struct DarkeningRelay {
    port: u16,
    /// Whether the next connection to carry the trigger goes dark (only the first one does).
    armed: Arc<AtomicBool>,
    went_dark: Arc<AtomicBool>,
    /// Bumped by [`Self::heal`]: every connection open then is cut.
    cuts: Arc<watch::Sender<u64>>,
}

impl DarkeningRelay {
    /// Listens on a free port of 127.0.0.1 and relays every connection to the server on
    /// `upstream_port`. The first connection on which a client publishes on the subject
    /// `trigger` goes dark.
    pub async fn start(upstream_port: u16, trigger: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            port: listener.local_addr().unwrap().port(),
            armed: Arc::new(AtomicBool::new(true)),
            went_dark: Arc::new(AtomicBool::new(false)),
            cuts: Arc::new(watch::channel(0).0),
        };
        let relays = relay.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                    tokio::spawn(relays.clone().relay(client, server, trigger));
                }
            }
        });
        relay
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether a connection has gone dark yet.
    pub fn went_dark(&self) -> bool {
        self.went_dark.load(Ordering::SeqCst)
    }

    /// Cuts every open connection; the clients reconnect, and new connections pass everything.
    pub fn heal(&self) {
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    async fn relay(self, client: TcpStream, server: TcpStream, trigger: &'static str) {
        // A publication on the subject (`PUB` or `HPUB`), not a subscription to it.
        let trigger = format!("PUB {trigger} ").into_bytes();
        let trigger = trigger.as_slice();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let dark = AtomicBool::new(false);
        let mut cuts = self.cuts.subscribe();
        let up = async {
            let mut buffer = vec![0u8; 64 * 1024];
            // The tail of what came before, so that a trigger split across two reads is seen.
            let mut seen = Vec::new();
            loop {
                let read = match from_client.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                seen.extend_from_slice(&buffer[..read]);
                if seen.windows(trigger.len()).any(|window| window == trigger)
                    && self.armed.swap(false, Ordering::SeqCst)
                {
                    // Dark before the message is passed on: its reply cannot slip through.
                    dark.store(true, Ordering::SeqCst);
                    self.went_dark.store(true, Ordering::SeqCst);
                }
                seen.drain(..seen.len().saturating_sub(trigger.len()));
                if to_server.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let read = match from_server.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                if dark.load(Ordering::SeqCst) {
                    continue;
                }
                if to_client.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = up => {}
            () = down => {}
            _ = cuts.changed() => {}
        }
        // Dropping the halves closes both connections.
    }
}
