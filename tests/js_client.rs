//! The JavaScript client's own tests (`clients/js/test/client.test.js`, Node's test runner),
//! run from `cargo test`: they start a real `redis-server` and real chat nodes (this crate's
//! `chat` example, built here) themselves, kill nodes, cut connections and restart Redis.
//! Node 20 needs `--experimental-websocket` for its built-in WebSocket; Node 22 has it.

mod support;

use std::process::Command;

/// The major version of the `node` on PATH.
fn node_major() -> u32 {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .expect("node (20 or later) must be on PATH for the JavaScript client's tests");
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `node --version`: {version}"))
}

#[test]
fn the_javascript_client_against_real_nodes_and_redis() {
    let chat = support::chat_binary();
    let major = node_major();
    assert!(
        major >= 20,
        "the client needs Node 20 or later, found {major}"
    );
    let mut node = Command::new("node");
    if major < 22 {
        node.arg("--experimental-websocket");
    }
    let manifest = env!("CARGO_MANIFEST_DIR");
    let out = node
        .args(["--test", "--test-reporter=tap", "test/client.test.js"])
        .current_dir(format!("{manifest}/clients/js"))
        .env("CHAT_BIN", &chat)
        .output()
        .expect("run node --test");
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the JavaScript client's tests failed:\n{report}\n{stderr}"
    );
    // Every test ran and passed, none skipped: a runner that found nothing must not pass.
    let count = |prefix: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert_eq!(count("# fail"), Some(0), "{report}");
    assert_eq!(count("# skipped"), Some(0), "{report}");
    assert!(count("# pass").is_some_and(|n| n >= 8), "{report}");
}

/// The example pages' module scripts parse (`node --check`): the board's and the chat's, which
/// run on the client.
#[test]
fn the_example_page_scripts_parse() {
    let manifest = env!("CARGO_MANIFEST_DIR");
    for (name, page) in [("board", "board/page.html"), ("chat", "chat_app/page.html")] {
        let page = std::fs::read_to_string(format!("{manifest}/examples/{page}"))
            .unwrap_or_else(|e| panic!("the {name} page: {e}"));
        let start = page
            .find("<script type=\"module\">")
            .expect("a module script")
            + "<script type=\"module\">".len();
        let end = page[start..].find("</script>").expect("its end") + start;
        let path =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-page.mjs"));
        std::fs::write(&path, &page[start..end]).expect("write the script");
        let out = Command::new("node")
            .arg("--check")
            .arg(&path)
            .output()
            .expect("run node --check");
        assert!(
            out.status.success(),
            "the {name} page's script does not parse:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
