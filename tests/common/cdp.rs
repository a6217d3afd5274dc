//! A small Chrome DevTools Protocol client for the report's browser test: headless Chromium
//! (Debian's `chromium`, installed by scripts/setup), one page, JSON commands over a WebSocket.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// Kills Chromium when dropped, also when a launch step panics half-way.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Browser {
    // Dropped after the socket: fields drop in declaration order.
    ws: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    _child: Kill,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is not installed: the browser test needs Debian's chromium package (scripts/setup installs it)");
}

fn http_get(port: u16, path: &str) -> String {
    ureq::get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

impl Browser {
    /// Starts headless Chromium and attaches to its first page.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let mut child = Kill(child);
        let stderr = child.0.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium printed its DevTools address");
        let port: u16 = browser_url
            .trim_start_matches("ws://127.0.0.1:")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let page_url = loop {
            let list: Value =
                serde_json::from_str(&http_get(port, "/json/list")).unwrap_or(json!([]));
            if let Some(url) = list
                .as_array()
                .and_then(|l| l.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break url.to_string();
            }
            assert!(Instant::now() < deadline, "chromium opened no page");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (ws, _) = tungstenite::connect(page_url.as_str()).expect("connect to the page");
        let mut b = Browser {
            ws,
            _child: child,
            next_id: 0,
            _profile: profile,
        };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// Sends a command and returns its result; events in between are dropped, except that
    /// `until_event` (if given) must also arrive before this returns.
    fn call_and_wait(&mut self, method: &str, params: Value, until_event: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).expect("send to DevTools");
        let mut result = None;
        let mut event_seen = until_event.is_none();
        let deadline = Instant::now() + Duration::from_secs(60);
        while result.is_none() || !event_seen {
            assert!(
                Instant::now() < deadline,
                "DevTools did not answer {method}"
            );
            let m = self.ws.read().expect("read from DevTools");
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                result = Some(v["result"].clone());
            } else if Some(v["method"].as_str().unwrap_or("")) == until_event {
                event_seen = true;
            } else if v["method"] == "Runtime.exceptionThrown" {
                panic!("the page threw: {}", v["params"]["exceptionDetails"]);
            }
        }
        result.unwrap()
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.call_and_wait(method, params, None)
    }

    /// Opens `file` and waits for its load event.
    pub fn open(&mut self, file: &Path) {
        let url = format!("file://{}", file.canonicalize().unwrap().display());
        self.navigate(&url);
    }

    /// Opens `url` and waits for its load event.
    pub fn navigate(&mut self, url: &str) {
        self.call_and_wait(
            "Page.navigate",
            json!({"url": url}),
            Some("Page.loadEventFired"),
        );
    }

    /// Evaluates a JavaScript expression and returns its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// A real mouse click at the centre of the element `selector` selects.
    pub fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let xy = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (xy[0].as_f64().unwrap(), xy[1].as_f64().unwrap());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Saves a PNG screenshot of the page.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}
