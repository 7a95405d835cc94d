//! `kubectl exec` over the Kubernetes WebSocket channel protocol (`v5.channel.k8s.io`, and
//! `v4.channel.k8s.io`): every binary message starts with its channel, 0 stdin, 1 stdout,
//! 2 stderr, 3 error (a `metav1.Status` when the command ends), 4 resize (a terminal size as
//! JSON); v5 adds 255, "close this stream" (`[255, 0]`: the client's stdin is done).
//!
//! The command runs in the container's sandbox (`container::spawn_exec`). The session ends
//! when the command has exited and its output is sent: the status on channel 3, then a normal
//! WebSocket close (what ends the client's streams). A client that goes away first takes the
//! command with it (SIGKILL to its process group).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Shared;
use super::container::{self, Io};
use super::kubelet::{flag, query_pairs};
use super::pod::ExecTarget;

/// The subprotocols served, preferred first.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// `PodExecOptions` as the API server passes them on.
#[derive(Debug, Default, PartialEq)]
pub struct Options {
    pub command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl Options {
    pub fn parse(query: Option<&str>) -> Result<Options, String> {
        let mut o = Options::default();
        for (name, value) in query_pairs(query) {
            match name.as_str() {
                "command" => o.command.push(value),
                "input" | "stdin" => o.stdin = flag(&name, &value)?,
                "output" | "stdout" => o.stdout = flag(&name, &value)?,
                "error" | "stderr" => o.stderr = flag(&name, &value)?,
                "tty" => o.tty = flag(&name, &value)?,
                _ => {}
            }
        }
        // As the kubelet: a terminal has no separate stderr.
        o.stderr &= !o.tty;
        if !(o.stdin || o.stdout || o.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        if o.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        Ok(o)
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut f = Vec::with_capacity(data.len() + 1);
    f.push(channel);
    f.extend_from_slice(data);
    Message::Binary(f.into())
}

/// The error channel's last word: the `metav1.Status` of how the command ended.
fn status(exit: Result<std::process::ExitStatus, String>) -> Value {
    match exit {
        Ok(s) if s.success() => json!({ "metadata": {}, "status": "Success" }),
        Ok(s) => {
            // Like a container runtime: death by signal N is exit code 128+N.
            let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
            })
        }
        Err(e) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("error executing command in container: {e}"),
            "reason": "InternalError",
            "code": 500,
            "details": { "causes": [{ "message": e }] },
        }),
    }
}

/// A pseudo-terminal: the master side stays here, the slave becomes the command's terminal.
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let err = std::io::Error::last_os_error;
    // SAFETY: plain libc calls on descriptors this function owns; `name` is NUL-terminated
    // by ptsname_r.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(err());
        }
        let master = OwnedFd::from_raw_fd(fd);
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(err());
        }
        let mut name = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(fd, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if slave < 0 {
            return Err(err());
        }
        Ok((master, OwnedFd::from_raw_fd(slave)))
    }
}

/// Channel 4: `{"Width": w, "Height": h}` for the terminal.
fn resize(master: &OwnedFd, data: &[u8]) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let Ok(size) = serde_json::from_slice::<Size>(data) else {
        return;
    };
    let ws = libc::winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Copies a stream of the command to the client, as messages of `channel`.
async fn pump(mut from: impl AsyncRead + Unpin, channel: u8, to: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 32 * 1024];
    // A terminal's master reads EIO once the command side is closed: an end like EOF.
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if to.send(frame(channel, &buf[..n])).await.is_err() {
            return;
        }
    }
}

/// Feeds the client's stdin to the command; the command's stdin closes with the channel.
async fn feed(mut to: impl AsyncWrite + Unpin, mut from: mpsc::Receiver<Bytes>) {
    while let Some(data) = from.recv().await {
        if to.write_all(&data).await.is_err() || to.flush().await.is_err() {
            return;
        }
    }
}

fn file(fd: OwnedFd) -> tokio::fs::File {
    tokio::fs::File::from_std(std::fs::File::from(fd))
}

/// The terminal of an exec with `tty`: the master side (for resizes), and copies of it to
/// read the output from and write the input to.
struct Terminal {
    master: OwnedFd,
    reader: OwnedFd,
    writer: OwnedFd,
}

/// Starts the command: in the container's sandbox, on pipes or on a new terminal.
fn start(
    shared: &Shared,
    target: &ExecTarget,
    opts: &Options,
    spec_file: &std::path::Path,
) -> std::io::Result<(tokio::process::Child, Option<Terminal>)> {
    let command = opts.command.clone();
    if !opts.tty {
        let io = Io::Pipes {
            stdin: opts.stdin,
            stdout: opts.stdout,
            stderr: opts.stderr,
        };
        let child = container::spawn_exec(shared, &target.spec, command, spec_file, io)?;
        return Ok((child, None));
    }
    let (master, slave) = open_pty()?;
    let terminal = Terminal {
        reader: master.try_clone()?,
        writer: master.try_clone()?,
        master,
    };
    // The slave is the command's alone from here: the output ends when the command is done.
    let child = container::spawn_exec(shared, &target.spec, command, spec_file, Io::Tty(slave))?;
    Ok((child, Some(terminal)))
}

/// Names each exec's launch spec file apart.
static EXECS: AtomicU64 = AtomicU64::new(0);

/// Runs one exec session on an upgraded connection, to its end.
pub async fn session(
    shared: Arc<Shared>,
    target: ExecTarget,
    container: String,
    opts: Options,
    v5: bool,
    socket: WebSocket,
) {
    let (mut sink, mut incoming) = socket.split();
    // Every message to the client goes through one writer, and the close after the last.
    let (out, mut outgoing) = mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(m) = outgoing.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let close = CloseFrame {
            code: close_code::NORMAL,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
    });

    let n = EXECS.fetch_add(1, Ordering::Relaxed);
    let spec_file = target.pod_dir.join(format!("{container}.exec-{n}.json"));
    let started = start(&shared, &target, &opts, &spec_file);
    let (mut child, terminal) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&spec_file);
            let _ = out
                .send(frame(
                    ERROR,
                    status(Err(e.to_string())).to_string().as_bytes(),
                ))
                .await;
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    // Its process group (it leads one): a fresh child always has its pid.
    let pgid = child.id().filter(|&pid| pid > 0);
    let groups = || shared.groups.lock().unwrap_or_else(|p| p.into_inner());
    groups().extend(pgid);

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let mut stdin_tx = Some(stdin_tx);
    let mut pumps = Vec::new();
    let master = match terminal {
        Some(Terminal {
            master,
            reader,
            writer,
        }) => {
            pumps.push(tokio::spawn(pump(file(reader), STDOUT, out.clone())));
            tokio::spawn(feed(file(writer), stdin_rx));
            Some(master)
        }
        None => {
            if let Some(stdout) = child.stdout.take() {
                pumps.push(tokio::spawn(pump(stdout, STDOUT, out.clone())));
            }
            if let Some(stderr) = child.stderr.take() {
                pumps.push(tokio::spawn(pump(stderr, STDERR, out.clone())));
            }
            match child.stdin.take() {
                Some(stdin) => drop(tokio::spawn(feed(stdin, stdin_rx))),
                None => stdin_tx = None,
            }
            None
        }
    };

    // What the client sends; ends when it closes or goes away.
    let reader = async {
        while let Some(Ok(message)) = incoming.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            match data.first() {
                Some(&STDIN) => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(data.slice(1..)).await;
                    }
                }
                Some(&RESIZE) => {
                    if let Some(master) = &master {
                        resize(master, &data[1..]);
                    }
                }
                Some(&CLOSE) if v5 && data.get(1) == Some(&STDIN) => stdin_tx = None,
                _ => {}
            }
        }
    };
    let mut reader = std::pin::pin!(reader);
    let finished = async {
        let exit = child.wait().await.map_err(|e| e.to_string());
        futures::future::join_all(pumps).await;
        exit
    };
    tokio::select! {
        exit = finished => {
            let _ = out.send(frame(ERROR, status(exit).to_string().as_bytes())).await;
            drop(out);
            let _ = writer.await;
            // The client answers the close; give it a moment.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut reader).await;
        }
        () = &mut reader => {
            tracing::info!(%container, "exec: the client went away; killing the command");
            if let Some(pgid) = pgid {
                // SAFETY: signalling a process group has no memory-safety preconditions.
                unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
            }
        }
    }
    if let Some(pgid) = pgid {
        groups().remove(&pgid);
    }
    let _ = std::fs::remove_file(&spec_file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_as_the_api_server_sends_them() {
        let o = Options::parse(Some(
            "command=sh&command=-c&command=echo+%24HOME&stdin=1&stdout=1&stderr=1",
        ))
        .unwrap();
        assert_eq!(o.command, ["sh", "-c", "echo $HOME"]);
        assert!(o.stdin && o.stdout && o.stderr && !o.tty);
        let tty = Options::parse(Some("command=sh&stdout=1&stderr=1&tty=1")).unwrap();
        assert!(tty.tty && !tty.stderr, "a terminal has no separate stderr");
        assert!(Options::parse(Some("command=sh")).is_err(), "no stream");
        assert!(Options::parse(Some("stdout=1")).is_err(), "no command");
    }

    #[test]
    fn the_status_carries_the_exit_code_as_client_go_reads_it() {
        use std::process::ExitStatus;
        assert_eq!(
            status(Ok(ExitStatus::from_raw(0))),
            json!({"metadata": {}, "status": "Success"})
        );
        let failed = status(Ok(ExitStatus::from_raw(3 << 8)));
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(
            failed["details"]["causes"],
            json!([{"reason": "ExitCode", "message": "3"}])
        );
        let killed = status(Ok(ExitStatus::from_raw(libc::SIGKILL)));
        assert_eq!(killed["details"]["causes"][0]["message"], "137");
        assert_eq!(status(Err("boom".into()))["reason"], "InternalError");
    }
}
