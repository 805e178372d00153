//! A TCP proxy that can stall: while stalled it accepts and keeps every connection open but
//! forwards no byte either way, as a peer gone without a reset or a middlebox holding the
//! traffic does. Nothing is dropped: held bytes go on when it resumes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct StallProxy {
    pub port: u16,
    stalled: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn flowing(stalled: &mut watch::Receiver<bool>) {
    let _ = stalled.wait_for(|s| !*s).await;
}

async fn pump<R, W>(mut from: R, mut to: W, mut stalled: watch::Receiver<bool>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                flowing(&mut stalled).await;
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        flowing(&mut stalled).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl StallProxy {
    /// Forwards a local port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stalled, watching) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut watching = watching.clone();
                tokio::spawn(async move {
                    flowing(&mut watching).await;
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::join!(
                        pump(cr, uw, watching.clone()),
                        pump(ur, cw, watching.clone())
                    );
                });
            }
        });
        StallProxy {
            port,
            stalled,
            task,
        }
    }

    /// Holds every byte from now on.
    pub fn stall(&self) {
        let _ = self.stalled.send(true);
    }

    /// Lets the held bytes and new ones through.
    pub fn resume(&self) {
        let _ = self.stalled.send(false);
    }

    /// Stalls for `d`, then resumes.
    pub async fn stall_for(&self, d: Duration) {
        self.stall();
        tokio::time::sleep(d).await;
        self.resume();
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
