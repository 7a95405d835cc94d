//! A TCP proxy a test can freeze: it stops forwarding in both directions but keeps every
//! connection open, as a network partition or a frozen peer does. Neither end sees a close or
//! a reset, and the proxy's kernel keeps acknowledging, so keepalives do not help either.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FreezingProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
}

impl FreezingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy listen: {e}"));
        let port = listener.local_addr().expect("bound").port();
        let (frozen, rx) = watch::channel(false);
        let mut dropped = rx.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    changed = dropped.changed() => match changed {
                        Ok(()) => continue,
                        Err(_) => return,
                    },
                };
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, rx.clone()));
                tokio::spawn(forward(server_read, client_write, rx.clone()));
            }
        });
        FreezingProxy { port, frozen }
    }

    /// From now on nothing passes; connections stay open for as long as the proxy lives.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => Some(read),
            _ = frozen.wait_for(|f| *f) => None,
        };
        let n = match read {
            Some(Ok(0) | Err(_)) => return,
            Some(Ok(n)) => n,
            None => {
                // Hold both halves without reading or writing until the proxy is dropped.
                while frozen.changed().await.is_ok() {}
                return;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
