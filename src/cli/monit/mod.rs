//! `clusterd monit`: a live terminal dashboard (PM2's `pm2 monit`) over the control socket
//! only. Threads feed one channel: a poller asks `status` once a second, a follower streams
//! the selected app's `logs --follow`, the terminal's input and SIGTERM/SIGINT/SIGHUP arrive
//! as messages, and each request sent from a key runs on a thread of its own. The main
//! thread owns the [`model::Model`] and the terminal, and redraws only after a change, at
//! most every [`FRAME`]. The terminal is restored on every way out: a key, a signal, an
//! error, a panic.

pub mod model;
pub mod view;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use anyhow::Context;
use clusterd_proto::{Envelope, LogLine, MAX_FRAME, Reply, Request, Status, encode_line};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event};
use ratatui::crossterm::{cursor, execute, terminal};

use self::model::{Command, Model};
use super::client::{self, Target};

/// The shortest time between two redraws (at most 4 a second).
pub const FRAME: Duration = Duration::from_millis(250);

/// How often the supervisor is asked for its status.
pub const POLL: Duration = Duration::from_secs(1);

/// Log lines asked for when following an app starts.
const BACKLOG: usize = 50;

/// Messages waiting for the main thread; a full queue makes its senders wait (a log follower
/// that waits long enough is dropped by the supervisor and started again).
const QUEUE: usize = 1024;

/// What the main thread hears about.
enum Msg {
    /// A status answer, or why there was none.
    Status(Result<Box<Status>, String>),
    /// A line from the follower number `.0`.
    Log(u64, Box<LogLine>),
    /// Follower number `.0` ended.
    LogsEnded(u64),
    /// The terminal's input (keys, resizes).
    Input(Event),
    /// What came of a request sent from a key.
    Done(String),
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
}

/// `clusterd monit`.
pub fn monit(file: Option<PathBuf>, mut target: Target) -> ExitCode {
    if let Some(file) = file {
        target.manifest = file;
    }
    if !io::IsTerminal::is_terminal(&io::stdout()) {
        eprintln!("clusterd: monit: stdout is not a terminal (try `clusterd status`)");
        return ExitCode::from(super::EXIT_USAGE);
    }
    match target.socket_path().and_then(|socket| run(&socket)) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(signal)) => ExitCode::from(128 + signal as u8),
        Err(error) => {
            eprintln!("clusterd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the dashboard until a quit key (`None`) or a signal (`Some(number)`).
fn run(socket: &Path) -> anyhow::Result<Option<i32>> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .context("cannot handle signals")?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = signal_tx.send(Msg::Signal(signal));
        }
    });
    spawn_poller(socket.to_owned(), tx.clone());
    let mut screen = Screen::enter().context("cannot set up the terminal")?;
    let input_tx = tx.clone();
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if input_tx.send(Msg::Input(event)).is_err() {
                break;
            }
        }
    });
    let result = Dashboard::new(socket, tx).run(&rx, &mut screen);
    drop(screen);
    result
}

/// The terminal in raw mode on the alternate screen, cursor hidden, for as long as it lives;
/// restored on drop and, through a panic hook, before a panic's message is printed.
struct Screen {
    terminal: Terminal<CrosstermBackend<io::Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        terminal::enable_raw_mode()?;
        let entered = execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match entered {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(error) => {
                restore();
                Err(error)
            }
        }
    }

    fn draw(&mut self, model: &Model) -> io::Result<()> {
        self.terminal
            .draw(|frame| view::draw(frame, model))
            .map(|_| ())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Raw mode off, the alternate screen left, the cursor shown (each step tried even when
/// another failed; doing it twice is harmless).
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    let _ = io::stdout().flush();
}

/// Asks `status` every [`POLL`], forever (until the main thread is gone).
fn spawn_poller(socket: PathBuf, tx: SyncSender<Msg>) {
    std::thread::spawn(move || {
        loop {
            let asked = Instant::now();
            let answer = match client::call(&socket, Request::Status {}, Some(POLL * 2), |_| Ok(()))
            {
                Ok(Reply::Status(status)) => Ok(status),
                Ok(other) => Err(format!("unexpected reply: {other:?}")),
                Err(error) => Err(format!("{error:#}")),
            };
            if tx.send(Msg::Status(answer)).is_err() {
                return;
            }
            std::thread::sleep(POLL.saturating_sub(asked.elapsed()));
        }
    });
}

/// When to redraw: after a change, and never sooner than [`FRAME`] after the last redraw.
#[derive(Debug, Default)]
pub struct Redraw {
    changed: bool,
    drawn: Option<Instant>,
}

impl Redraw {
    /// Something shown changed.
    pub fn changed(&mut self) {
        self.changed = true;
    }

    /// Whether to draw at `now`; if so, the drawing is counted as done.
    pub fn now(&mut self, now: Instant) -> bool {
        let due = self.changed && self.drawn.is_none_or(|at| now >= at + FRAME);
        if due {
            self.changed = false;
            self.drawn = Some(now);
        }
        due
    }

    /// How long to wait for the next message: until a pending change may be drawn, or
    /// (`None`) as long as it takes when nothing changed.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.changed.then(|| {
            self.drawn
                .map_or(now, |at| at + FRAME)
                .saturating_duration_since(now)
        })
    }
}

/// The follower of one app's log lines.
struct Follower {
    /// Its number: lines of an older follower are ignored.
    id: u64,
    /// A handle on its connection, shut down to stop it.
    stream: UnixStream,
}

/// The main thread's state: the model and what runs for it.
struct Dashboard {
    socket: PathBuf,
    tx: SyncSender<Msg>,
    model: Model,
    follower: Option<Follower>,
    followers: u64,
}

impl Dashboard {
    fn new(socket: &Path, tx: SyncSender<Msg>) -> Dashboard {
        Dashboard {
            socket: socket.to_owned(),
            tx,
            model: Model::default(),
            follower: None,
            followers: 0,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>, screen: &mut Screen) -> anyhow::Result<Option<i32>> {
        let mut redraw = Redraw::default();
        redraw.changed();
        loop {
            let now = Instant::now();
            if redraw.now(now) {
                screen.draw(&self.model).context("drawing")?;
            }
            let message = match redraw.wait(now) {
                Some(wait) => rx.recv_timeout(wait),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let message = match message {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            };
            match message {
                Msg::Status(Ok(status)) => {
                    self.model.on_status(*status, Instant::now());
                    self.follow();
                }
                Msg::Status(Err(reason)) => self.model.on_disconnected(reason),
                Msg::Log(id, line) => {
                    if self.follower.as_ref().is_none_or(|f| f.id != id) {
                        continue;
                    }
                    self.model.on_log(*line);
                }
                Msg::LogsEnded(id) => {
                    // Started again with the next status (not at once: the supervisor may be
                    // gone).
                    if self.follower.as_ref().is_some_and(|f| f.id == id) {
                        self.follower = None;
                    }
                    continue;
                }
                Msg::Input(Event::Key(key)) => match self.model.on_key(key) {
                    Some(Command::Quit) => return Ok(None),
                    Some(Command::Send(request, what)) => self.send(request, what),
                    None => self.follow(),
                },
                Msg::Input(Event::Resize(..)) => {}
                Msg::Input(_) => continue,
                Msg::Done(message) => self.model.message = Some(message),
                Msg::Signal(signal) => return Ok(Some(signal)),
            }
            redraw.changed();
        }
    }

    /// Follows the selected app's lines, starting a new follower when the app changed or the
    /// last one ended.
    fn follow(&mut self) {
        let app = self.model.selected_app();
        if app == self.model.log_app && self.follower.is_some() {
            return;
        }
        if let Some(old) = self.follower.take() {
            let _ = old.stream.shutdown(std::net::Shutdown::Both);
        }
        self.model.follow(app.clone());
        let Some(app) = app else {
            return;
        };
        // A new follower sends the backlog again: start from an empty pane.
        self.model.logs.clear();
        self.followers += 1;
        let id = self.followers;
        match start_follower(&self.socket, app, id, self.tx.clone()) {
            Ok(stream) => self.follower = Some(Follower { id, stream }),
            Err(error) => self.model.message = Some(format!("logs: {error:#}")),
        }
    }

    /// Sends a request on a thread of its own; its outcome comes back as [`Msg::Done`].
    fn send(&mut self, request: Request, what: String) {
        self.model.message = Some(format!("{what}..."));
        let (socket, tx) = (self.socket.clone(), self.tx.clone());
        std::thread::spawn(move || {
            let outcome =
                match client::call(&socket, request, Some(Duration::from_secs(30)), |_| Ok(())) {
                    Ok(Reply::Done { message }) => format!("{what}: {message}"),
                    Ok(Reply::Error { message, .. }) => format!("{what} refused: {message}"),
                    Ok(other) => format!("{what}: {other:?}"),
                    Err(error) => format!("{what} failed: {error:#}"),
                };
            let _ = tx.send(Msg::Done(outcome));
        });
    }
}

/// Connects and asks for `app`'s last lines and the new ones; a thread reads them into
/// [`Msg::Log`] until the connection ends. Returns a handle on the connection.
fn start_follower(
    socket: &Path,
    app: String,
    id: u64,
    tx: SyncSender<Msg>,
) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&encode_line(&Envelope::new(Request::Logs {
        app: Some(app),
        slot: None,
        lines: BACKLOG,
        follow: true,
    })))?;
    let handle = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            match reader
                .by_ref()
                .take(MAX_FRAME as u64 * 2)
                .read_line(&mut line)
            {
                Ok(n) if n > 0 && line.ends_with('\n') => {}
                _ => break,
            }
            match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Log(log)) => {
                    if tx.send(Msg::Log(id, log)).is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        let _ = tx.send(Msg::LogsEnded(id));
    });
    Ok(handle)
}

#[cfg(test)]
mod tests;
