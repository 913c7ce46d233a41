//! The browser harness: a fleet of in-process chat nodes on one throwaway Redis, a chromedriver,
//! and pages that are each their own headless Chromium (like separate people), read through
//! the DOM's rendered text.
//!
//! A [`Scene`] is one case: [`run`] gives it to the case's body, then fails it on any console
//! error of any page, and on any failure saves a side-by-side screenshot of every page under
//! `target/tmp/browser/` and prints its path.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum_fanout::FanoutLayer;
use axum_fanout::durable::Durability;
use base64::Engine as _;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use futures_util::FutureExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chat_app;
use crate::support::{RedisServer, http};

/// Generous deadline for anything a page should show "soon": each page is a whole Chromium
/// on a shared 2-core CI machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Browser cases run one at a time: each opens several Chromiums, and running them in parallel
/// on a small machine only makes every deadline tighter. (A tokio mutex: it is held across
/// awaits, and works across the test runtimes.)
static ONE_CASE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `probe` every 50 ms until it returns `Ok`, or panics after [`DEADLINE`] with `what`
/// and the last thing the probe saw.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {DEADLINE:?} waiting for: {what}\nlast seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await, // deadline: polling
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

/// How the fleet's nodes run: plain pub/sub ([`PLAIN`], the default) or with durable rooms and
/// presence ([`DURABLE`]).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `HISTORY`: every room keeps its last N messages (0: plain pub/sub).
    pub history: usize,
    /// `PRESENCE=1` with this `PRESENCE_TTL_S`.
    pub presence_ttl: Option<Duration>,
}

/// Plain pub/sub nodes: no positions, no history, no presence.
pub const PLAIN: Settings = Settings {
    history: 0,
    presence_ttl: None,
};

/// Durable rooms (`HISTORY=256`) and presence with a short bound (`PRESENCE_TTL_S=3`), so a
/// killed node's members leave within seconds.
pub const DURABLE: Settings = Settings {
    history: 256,
    presence_ttl: Some(Duration::from_secs(3)),
};

/// One in-process chat node (`examples/chat_app`), on a Tokio runtime of its own so that it
/// can be killed like a crashed process: [`Node::kill`] drops every task of it (server,
/// connections, the layer's background tasks) at once, with no graceful step. Its port is
/// kept when it is stopped, so that it can be started again where its pages reconnect.
pub struct Node {
    id: String,
    addr: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    runtime: tokio::runtime::Runtime,
}

impl Node {
    async fn start(redis_url: &str, id: &str, port: u16, settings: Settings) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()
            .expect("a runtime for the node");
        // Built inside the node's runtime: the listener, the server and the layer's background
        // tasks all live there (and die with it).
        let (addr, handle, stop, task) = {
            let _inside = runtime.enter();
            let listener = std::net::TcpListener::bind(("127.0.0.1", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .unwrap_or_else(|e| panic!("node {id}: cannot listen on 127.0.0.1:{port}: {e}"));
            let addr = listener.local_addr().expect("a local address");
            let mut builder = FanoutLayer::builder(redis_url).node_id(id);
            if let Some(n) = std::num::NonZeroUsize::new(settings.history) {
                builder = builder.durable(Durability::default().history(n));
            }
            if let Some(ttl) = settings.presence_ttl {
                builder = builder.presence(true).presence_ttl(ttl);
            }
            let layer = builder.build().expect("a valid Redis URL");
            let handle = layer.handle();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let closer = handle.clone();
            let task = runtime.spawn(chat_app::serve_app(
                handle.listener(listener),
                chat_app::app(layer),
                async move {
                    let _ = stopped.await;
                    // Close every socket with 1001 (going away), as a node being restarted
                    // does.
                    closer.shutdown().await;
                },
            ));
            (addr, handle, stop, task)
        };
        let ready = handle.clone();
        drop(handle);
        eventually(&format!("node {id} ready"), || {
            let ready = ready.clone();
            async move { ready.is_ready().then_some(()).ok_or("not ready".to_owned()) }
        })
        .await;
        drop(ready);
        Self {
            id: id.to_owned(),
            addr,
            running: Some(Running {
                stop,
                task,
                runtime,
            }),
        }
    }

    /// The page's address on this node.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops the node: its sockets are closed with 1001 and its port stops answering.
    pub async fn stop(&mut self) {
        if let Some(Running {
            stop,
            task,
            runtime,
        }) = self.running.take()
        {
            let _ = stop.send(());
            let abort = task.abort_handle();
            let stopped = tokio::time::timeout(DEADLINE, task).await;
            runtime.shutdown_background();
            if stopped.is_err() {
                abort.abort();
                panic!("node {} did not stop within {DEADLINE:?}", self.id);
            }
        }
    }

    /// Kills the node, as SIGKILL kills a process: every task of its runtime is dropped at
    /// once (no close frame, no unsubscribe, no presence cleanup); its TCP connections, to
    /// browsers and to Redis, just end. Its members stay listed until their lease expires.
    pub fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            running.runtime.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway `redis-server` and chat nodes on it.
pub struct Fleet {
    redis: RedisServer,
    nodes: Vec<Node>,
    settings: Settings,
}

impl Fleet {
    /// Starts a Redis and one node per id, and waits until every node's link is up.
    pub async fn start(ids: &[&str], settings: Settings) -> Self {
        let redis = RedisServer::start();
        let mut nodes = Vec::new();
        for id in ids {
            nodes.push(Node::start(&redis.url(), id, 0, settings).await);
        }
        Self {
            redis,
            nodes,
            settings,
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Stops node `i` (see [`Node::stop`]).
    pub async fn stop(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    /// Starts node `i` again, same id and port.
    pub async fn start_again(&mut self, i: usize) {
        let (id, port) = (self.nodes[i].id.clone(), self.nodes[i].addr.port());
        self.nodes[i] = Node::start(&self.redis.url(), &id, port, self.settings).await;
    }

    /// Kills node `i` (see [`Node::kill`]).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts Redis on the same port without persistence: every room's history and every
    /// presence lease is lost (a new epoch for each durable room).
    /// Waits until every running node's link is up again.
    pub async fn restart_redis(&mut self) {
        self.redis.restart();
        for node in self.nodes.iter().filter(|n| n.running.is_some()) {
            let addr = node.addr;
            eventually(&format!("node {} ready again", node.id), || async move {
                let (status, body) = http(addr, "GET", "/healthz", "").await;
                (status == 200).then_some(()).ok_or(body)
            })
            .await;
        }
    }

    /// Broadcasts `body` (one JSON value) to `room` through node `i`'s HTTP push route, as a
    /// server-side producer would.
    pub async fn push(&self, i: usize, room: &str, body: &str) {
        self.post(i, &format!("/rooms/{room}/messages"), body).await;
    }

    /// POSTs `body` to `path` on node `i`, as a server-side application would; it must
    /// answer 200.
    pub async fn post(&self, i: usize, path: &str, body: &str) -> String {
        let (status, text) = http(self.nodes[i].addr, "POST", path, body).await;
        assert_eq!(status, 200, "POST {path} {body}: {text}");
        text
    }
}

// ---------------------------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------------------------

const INSTALL: &str = "the browser tests need Chromium and its WebDriver: \
     `apt-get install chromium chromium-driver` on Debian/Ubuntu (.ci/run installs them), \
     or set CHROME and CHROMEDRIVER to their paths";

/// `name` on PATH, or the path in the environment variable `var`.
fn executable(var: &str, names: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no {} on PATH: {INSTALL}", names.join(" or ")))
}

/// A `chromedriver` process (in its own process group, with the Chromiums it starts), killed
/// with them on drop.
pub struct Driver {
    child: Child,
    addr: SocketAddr,
    chrome: PathBuf,
}

impl Driver {
    pub async fn start() -> Self {
        let chrome = executable("CHROME", &["chromium", "chromium-browser", "google-chrome"]);
        let driver = executable("CHROMEDRIVER", &["chromedriver"]);
        // Kept for a failed run: what chromedriver and Chromium said.
        let log = artifacts().join("chromedriver.log");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = {
                use std::os::unix::process::CommandExt as _;
                Command::new(&driver)
                    .arg(format!("--port={port}"))
                    .arg(format!("--log-path={}", log.display()))
                    .process_group(0)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", driver.display()))
            };
            let mut me = Self {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                chrome: chrome.clone(),
            };
            if me.wait_ready().await {
                return me;
            }
        }
        panic!("chromedriver did not start (5 tries); {INSTALL}");
    }

    /// Whether chromedriver listens before it exits or the deadline.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // most likely the port was taken meanwhile
            }
            // It listens once it is ready for sessions.
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // deadline: polling
        }
        false
    }

    /// Opens a headless Chromium with a `width` x `height` viewport, on `url`.
    pub async fn open(&self, label: &str, url: &str, (width, height): (u32, u32)) -> Page {
        let caps = json!({
            "goog:chromeOptions": {
                "binary": self.chrome,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--lang=en-US", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking", "--disable-background-timer-throttling",
                    "--disable-renderer-backgrounding", "--hide-scrollbars",
                ],
                // The viewport exactly (a headless window is at least 500 px wide, and its
                // viewport smaller than the window); below 500 px, a phone.
                "mobileEmulation": { "deviceMetrics": {
                    "width": width, "height": height, "pixelRatio": 1,
                    "mobile": width < 500, "touch": width < 500,
                }},
            },
            // Keeps the page's console (console.error, uncaught exceptions, failed loads) for
            // `Page::console_errors`.
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{}", self.addr))
            .await
            .unwrap_or_else(|e| panic!("{label}: no Chromium session ({e}); {INSTALL}"));
        client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{label}: cannot open {url}: {e}"));
        Page {
            label: label.to_owned(),
            client,
            console: Mutex::new(Vec::new()),
            allow_socket_failures: Mutex::new(false),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and any Chromium a failed case left open.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a person sees on a chat page: its badges, its room tabs, and the room on show (or,
/// through [`Page::room_view`], another room's log as it would show).
#[derive(Debug, Clone, Deserialize)]
pub struct View {
    /// The connection state badge: "connected", "reconnecting (attempt 1)…", ...
    pub state: String,
    /// The line under the message box (why a message was not sent).
    pub hint: String,
    /// The node badge: "node n1 · port 12345".
    pub node: String,
    /// The page's rooms, one tab each, in order.
    pub tabs: Vec<Tab>,
    /// The room whose log this is.
    pub room: Option<String>,
    /// The room's message list, oldest first.
    pub items: Vec<Item>,
    /// Who is in the room on show, as the page lists them ("alice, bob"); `None` while the
    /// list is hidden (no presence, or not loaded yet).
    pub members: Option<String>,
}

/// One room's tab.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Tab {
    pub room: String,
    /// The unread count it shows ("" when none).
    pub unread: String,
    /// The room on show.
    pub active: bool,
}

/// One line of the message list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Item {
    /// A message (`"msg"`) or a notice from the page itself (`"notice"`).
    pub kind: String,
    /// The sender's name; `"data"` for a broadcast value that is not a chat message.
    pub who: Option<String>,
    pub text: String,
    /// The timestamp as shown.
    pub time: String,
    /// Shown as this page's own message.
    pub mine: bool,
}

impl View {
    /// The members the page lists, sorted as shown; empty while the list is hidden.
    pub fn members(&self) -> Vec<&str> {
        self.members
            .as_deref()
            .map(|m| m.split(", ").filter(|u| !u.is_empty()).collect())
            .unwrap_or_default()
    }

    pub fn messages(&self) -> Vec<&Item> {
        self.items.iter().filter(|i| i.kind == "msg").collect()
    }

    pub fn notices(&self) -> Vec<&str> {
        self.items
            .iter()
            .filter(|i| i.kind == "notice")
            .map(|i| i.text.as_str())
            .collect()
    }

    /// (sender, text) of every message, in order.
    pub fn said(&self) -> Vec<(String, String)> {
        self.messages()
            .iter()
            .map(|m| (m.who.clone().unwrap_or_default(), m.text.clone()))
            .collect()
    }
}

/// The rendered text of the page's parts, as one snapshot (one WebDriver call): the room on
/// show, or the room named by the script's argument (a hidden log reads as it would show).
const READ_VIEW: &str = r##"
const text = (el) => (el ? el.innerText.trim() : "");
const log = arguments[0] === null
  ? document.querySelector("#messages > .log:not([hidden])")
  : [...document.querySelectorAll("#messages > .log")].find((l) => l.dataset.room === arguments[0]);
return {
  state: text(document.getElementById("state")),
  hint: text(document.getElementById("hint")),
  node: text(document.getElementById("node")),
  tabs: [...document.querySelectorAll("#tabs > .tab")].map((tab) => ({
    room: tab.dataset.room,
    unread: text(tab.querySelector(".unread")),
    active: tab.getAttribute("aria-current") === "true",
  })),
  room: log ? log.dataset.room : null,
  items: [...(log ? log.children : [])].map((li) => ({
    kind: li.classList.contains("notice") ? "notice" : "msg",
    who: li.querySelector(".who") ? text(li.querySelector(".who")) : null,
    text: text(li.querySelector(".text")),
    time: text(li.querySelector("time")),
    mine: li.classList.contains("mine"),
  })),
  members: document.getElementById("who").hidden
    ? null : text(document.getElementById("members")),
};
"##;

/// One chat page in its own headless Chromium.
pub struct Page {
    pub label: String,
    client: Client,
    /// Every console entry read so far (reading the browser's log empties it).
    console: Mutex<Vec<Value>>,
    /// Set by a case that takes the page's node down: Chromium then reports each refused
    /// reconnect as a console error of its own, which the page cannot prevent.
    allow_socket_failures: Mutex<bool>,
}

impl Page {
    /// What the page shows now, of the room on show.
    pub async fn view(&self) -> View {
        self.read_view(Value::Null).await
    }

    /// What the page shows now, with `room`'s log in place of the one on show.
    pub async fn room_view(&self, room: &str) -> View {
        self.read_view(json!(room)).await
    }

    async fn read_view(&self, room: Value) -> View {
        let v = self
            .client
            .execute(READ_VIEW, vec![room])
            .await
            .unwrap_or_else(|e| panic!("{}: cannot read the page: {e}", self.label));
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{}: odd view: {e}", self.label))
    }

    /// Waits until `room`'s log satisfies `check`, whichever room is on show.
    pub async fn until_in<T>(
        &self,
        room: &str,
        what: &str,
        check: impl Fn(&View) -> Result<T, String>,
    ) -> T {
        let what = format!("{}: {room}: {what}", self.label);
        eventually(&what, || async { check(&self.room_view(room).await) }).await
    }

    /// Clicks `room`'s tab, and waits until it is on show.
    pub async fn switch_to(&self, room: &str) {
        self.client
            .execute(
                "[...document.querySelectorAll('#tabs > .tab')] \
                 .find((t) => t.dataset.room === arguments[0]).querySelector('.open').click();",
                vec![json!(room)],
            )
            .await
            .unwrap_or_else(|e| panic!("{}: no tab {room}: {e}", self.label));
        self.until(&format!("{room} on show"), |v| {
            (v.room.as_deref() == Some(room))
                .then_some(())
                .ok_or_else(|| format!("{:?}", v.room))
        })
        .await;
    }

    /// The page's address now (the page keeps its room on show in it).
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .unwrap_or_else(|e| panic!("{}: no address: {e}", self.label))
            .to_string()
    }

    /// Waits until the page's view satisfies `check` (which says what it saw otherwise).
    pub async fn until<T>(&self, what: &str, check: impl Fn(&View) -> Result<T, String>) -> T {
        let what = format!("{}: {what}", self.label);
        eventually(&what, || async { check(&self.view().await) }).await
    }

    /// Waits until the state badge reads `state` (its first word).
    pub async fn until_state(&self, state: &str) -> View {
        self.until(&format!("state {state}"), |v| {
            if v.state.split_whitespace().next() == Some(state) {
                Ok(v.clone())
            } else {
                Err(format!("state {:?}", v.state))
            }
        })
        .await
    }

    /// Types `text` into the input `#id` (replacing what was there), then `then` (e.g. Enter).
    async fn type_into(&self, id: &str, text: &str, then: &str) {
        let input = self
            .client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("{}: no #{id}: {e}", self.label));
        input.clear().await.expect("clear the input");
        input
            .send_keys(&format!("{text}{then}"))
            .await
            .unwrap_or_else(|e| panic!("{}: cannot type into #{id}: {e}", self.label));
    }

    /// Types `room` and `name` into the join form, presses Enter, and waits until the page
    /// shows that room, says it joined it, and is connected.
    pub async fn join(&self, room: &str, name: &str) {
        self.type_into("room", room, "").await;
        self.type_into("name", name, &enter()).await;
        let joined = format!("You joined room “{room}”.");
        self.until(&format!("joined {room} and connected"), |v| {
            let ok = v.state == "connected"
                && v.room.as_deref() == Some(room)
                && v.notices().first() == Some(&joined.as_str());
            ok.then_some(()).ok_or_else(|| format!("{v:?}"))
        })
        .await;
    }

    /// Types `text` into the message box and presses Enter.
    pub async fn say(&self, text: &str) {
        self.type_into("text", text, &enter()).await;
    }

    /// Puts `text` into the message box at once, as a paste does (typing 64 KiB key by key
    /// would take minutes), then presses Enter.
    pub async fn paste_and_enter(&self, text: &str) {
        self.client
            .execute(
                "const box = document.getElementById('text'); box.value = arguments[0]; \
                 box.dispatchEvent(new Event('input', { bubbles: true }));",
                vec![json!(text)],
            )
            .await
            .expect("paste");
        let input = self.client.find(Locator::Id("text")).await.expect("#text");
        input.send_keys(&enter()).await.expect("press Enter");
    }

    /// What the message box holds.
    pub async fn draft(&self) -> String {
        let input = self.client.find(Locator::Id("text")).await.expect("#text");
        input.prop("value").await.ok().flatten().unwrap_or_default()
    }

    /// Sends `frame` as it is on the page's socket (its client's), bypassing the page's own
    /// checks: what a buggy or hostile client would send.
    pub async fn send_raw_frame(&self, frame: &str) {
        self.client
            .execute(
                "window.fanoutClient.ws.send(arguments[0]);",
                vec![json!(frame)],
            )
            .await
            .unwrap_or_else(|e| panic!("{}: cannot send a raw frame: {e}", self.label));
    }

    /// Runs `script` in the page and returns what it returns (a page other than the chat's,
    /// whose view `view` cannot read).
    pub async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{}: cannot run a script: {e}", self.label))
    }

    /// Goes to `url` in the same browser (its storage kept), as a person would.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{}: cannot open {url}: {e}", self.label));
    }

    /// Reloads the page, as a person pressing F5.
    pub async fn reload(&self) {
        self.client
            .refresh()
            .await
            .unwrap_or_else(|e| panic!("{}: cannot reload: {e}", self.label));
    }

    /// Runs `script` in the page, as a page's own code would (a test of the harness itself).
    pub async fn run_script(&self, script: &str) {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{}: cannot run a script: {e}", self.label));
    }

    /// Accepts Chromium's own "WebSocket connection to ... failed" console errors on this page
    /// from now on (its node is being taken down; see `allow_socket_failures`).
    pub fn allow_socket_failures(&self) {
        *self
            .allow_socket_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
    }

    /// Reads the browser's log so far into `self.console`.
    async fn read_console(&self) {
        let entries = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .unwrap_or_else(|e| panic!("{}: cannot read the console: {e}", self.label));
        let entries = match entries {
            Value::Array(entries) => entries,
            other => panic!("{}: odd console log {other}", self.label),
        };
        self.console
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(entries);
    }

    /// The console errors since the last call: `console.error`, uncaught exceptions, failed
    /// loads. (Taken: a case that expects some takes them, and the final check sees the rest.)
    pub async fn take_console_errors(&self) -> Vec<String> {
        self.read_console().await;
        let allow = *self
            .allow_socket_failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *self.console.lock().unwrap_or_else(PoisonError::into_inner))
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .filter(|m| !(allow && m.contains("WebSocket connection to") && m.contains("failed")))
            .collect()
    }

    pub async fn screenshot(&self) -> Option<Vec<u8>> {
        self.client.screenshot().await.ok()
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

fn enter() -> String {
    char::from(Key::Enter).to_string()
}

/// chromedriver's log endpoint (not in the W3C standard, so not in fantoccini).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

// ---------------------------------------------------------------------------------------------
// Screenshots
// ---------------------------------------------------------------------------------------------

/// The width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert!(png.len() > 24 && &png[1..4] == b"PNG", "not a PNG");
    (be(16), be(20))
}

/// One PNG of `shots` side by side, each under its label, made by one more headless Chromium
/// (no image crate for a picture the browser can lay out).
pub async fn side_by_side(driver: &Driver, shots: &[(String, Vec<u8>)]) -> Vec<u8> {
    const GAP: u32 = 16;
    const LABEL: u32 = 28;
    let sizes: Vec<(u32, u32)> = shots.iter().map(|(_, png)| png_size(png)).collect();
    let width = sizes.iter().map(|s| s.0 + GAP).sum::<u32>() + GAP;
    let height = sizes.iter().map(|s| s.1).max().unwrap_or(0) + LABEL + 2 * GAP;
    let page = driver
        .open("screenshot", "about:blank", (width, height))
        .await;
    let images: Vec<Value> = shots
        .iter()
        .map(|(label, png)| {
            let src = base64::engine::general_purpose::STANDARD.encode(png);
            json!({ "label": label, "src": format!("data:image/png;base64,{src}") })
        })
        .collect();
    page.client
        .execute(
            r#"
            const [images, gap] = arguments;
            document.body.style.cssText =
              `margin:0;padding:${gap}px;display:flex;gap:${gap}px;align-items:flex-start;` +
              "background:#d9dce1;font:14px system-ui,sans-serif";
            const loads = images.map(({ label, src }) => {
              const fig = document.createElement("figure");
              fig.style.cssText = "margin:0";
              const caption = document.createElement("figcaption");
              caption.textContent = label;
              caption.style.cssText = "height:28px;color:#333";
              const img = document.createElement("img");
              img.style.cssText = "display:block;box-shadow:0 1px 4px #0004";
              fig.append(caption, img);
              document.body.append(fig);
              return new Promise((done) => { img.onload = done; img.src = src; });
            });
            return Promise.all(loads).then(() => true);
            "#,
            vec![json!(images), json!(GAP)],
        )
        .await
        .expect("lay out the screenshots");
    let png = page.client.screenshot().await.expect("a screenshot");
    page.close().await;
    png
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// Viewport sizes.
pub const DESKTOP: (u32, u32) = (900, 640);
pub const PHONE: (u32, u32) = (390, 700);

/// One case: the fleet, the browser and the pages it opened.
pub struct Scene {
    pub fleet: Fleet,
    driver: Driver,
    pages: Vec<Arc<Page>>,
}

impl Scene {
    /// Opens a page on node `node` (window `size`) and waits until it is connected.
    pub async fn open(&mut self, label: &str, node: usize, size: (u32, u32)) -> Arc<Page> {
        self.open_with(label, node, "", size).await
    }

    /// As [`Scene::open`], with `query` (e.g. `?room=team&user=dana`) after the page's address.
    pub async fn open_with(
        &mut self,
        label: &str,
        node: usize,
        query: &str,
        size: (u32, u32),
    ) -> Arc<Page> {
        let url = format!("{}{query}", self.fleet.node(node).url());
        let page = Arc::new(self.driver.open(label, &url, size).await);
        self.pages.push(page.clone());
        page.until_state("connected").await;
        page
    }

    /// Opens several pages at once (each Chromium takes a moment to start).
    pub async fn open_all<const N: usize>(
        &mut self,
        specs: [(&str, usize, (u32, u32)); N],
    ) -> [Arc<Page>; N] {
        let opening = specs.map(|(label, node, size)| {
            let url = self.fleet.node(node).url();
            let driver = &self.driver;
            async move { driver.open(label, &url, size).await }
        });
        let pages: Vec<Arc<Page>> = futures_util::future::join_all(opening)
            .await
            .into_iter()
            .map(Arc::new)
            .collect();
        for page in &pages {
            self.pages.push(page.clone());
            page.until_state("connected").await;
        }
        pages.try_into().unwrap_or_else(|_| unreachable!())
    }

    /// Closes `page` (its Chromium quits, as a person closing the tab): it is no longer
    /// checked or photographed.
    pub async fn close(&mut self, page: Arc<Page>) {
        let errors = page.take_console_errors().await;
        assert!(
            errors.is_empty(),
            "{}: console errors before closing: {errors:?}",
            page.label
        );
        self.pages.retain(|p| !Arc::ptr_eq(p, &page));
        let page = Arc::try_unwrap(page).unwrap_or_else(|_| panic!("the page is still in use"));
        page.close().await;
    }

    /// Every page's screenshot, side by side, as one PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        let mut shots = Vec::new();
        for page in &self.pages {
            if let Some(png) = page.screenshot().await {
                shots.push((page.label.clone(), png));
            }
        }
        side_by_side(&self.driver, &shots).await
    }

    /// Fails if any page logged a console error.
    async fn assert_no_console_errors(&self) {
        let mut errors = Vec::new();
        for page in &self.pages {
            for e in page.take_console_errors().await {
                errors.push(format!("{}: {e}", page.label));
            }
        }
        assert!(
            errors.is_empty(),
            "console errors:\n  {}",
            errors.join("\n  ")
        );
    }
}

/// Where artifacts go: `target/tmp/browser/`.
pub fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("create target/tmp/browser");
    dir
}

/// Runs one case on a fresh fleet (nodes `n1`, `n2`, `n3`): `body`, then the console check.
/// On failure it saves every page side by side as `target/tmp/browser/<name>.png`, prints
/// the path and what each page showed, and fails with the case's own message.
pub async fn run(name: &str, body: impl AsyncFnOnce(&mut Scene)) {
    run_on(name, &["n1", "n2", "n3"], PLAIN, body).await;
}

/// Like [`run`], on nodes running with durable rooms and presence ([`DURABLE`]).
pub async fn run_durable(name: &str, body: impl AsyncFnOnce(&mut Scene)) {
    run_on(name, &["n1", "n2", "n3"], DURABLE, body).await;
}

/// Like [`run`], with the given node ids and settings.
pub async fn run_on(
    name: &str,
    ids: &[&str],
    settings: Settings,
    body: impl AsyncFnOnce(&mut Scene),
) {
    let _one = ONE_CASE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut scene = Scene {
        fleet: Fleet::start(ids, settings).await,
        driver: Driver::start().await,
        pages: Vec::new(),
    };
    let outcome = AssertUnwindSafe(async {
        body(&mut scene).await;
        scene.assert_no_console_errors().await;
    })
    .catch_unwind()
    .await;
    if outcome.is_err() {
        let path = artifacts().join(format!("{name}.png"));
        let shot = AssertUnwindSafe(scene.screenshot()).catch_unwind().await;
        match shot.map(|png| std::fs::write(&path, png)) {
            Ok(Ok(())) => eprintln!("browser case {name} failed: screenshot {}", path.display()),
            _ => eprintln!("browser case {name} failed; no screenshot could be taken"),
        }
        for page in &scene.pages {
            if let Ok(view) = AssertUnwindSafe(page.view()).catch_unwind().await {
                eprintln!("{} showed: {view:#?}", page.label);
            }
        }
    }
    for page in std::mem::take(&mut scene.pages) {
        if let Ok(page) = Arc::try_unwrap(page) {
            page.close().await;
        }
    }
    eprintln!("browser case {name}: {:.1?}", started.elapsed());
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
