//! `resume` (with `--durable`): how long a node takes to serve a resume of 1,000 messages of
//! a durable room (PROTOCOL.md part 2, "Durable rooms").
//!
//! A first client joins room `resume` with `positions=1` and reads the epoch from its
//! `fanout.position` notice, then publishes `resume_msgs` messages and reads them all back
//! (so they are stored). Then, `resume_tries` times, a new client connects to another node
//! with `positions=1&since=E:S0` (S0 being the position before the first message, 0 in a
//! fresh room) and the time from starting the TCP connect until the last replayed frame
//! (`"seq":S0+N`) arrived is one sample; the `fanout.resumed` notice must say
//! `recovered:true`. The nodes run with `HISTORY` at least `resume_msgs` (a room keeping 256
//! messages could not replay 1,000 and would refuse the resume as trimmed).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::procs::{Cluster, ClusterConfig, Target};
use crate::report::{Better, Figure, fig};
use crate::ws::{self, Proto};
use crate::{Context, Result, bail};

/// Whether a target runs durable rooms (`HISTORY` > 0 in its environment; a `--target-cmd`
/// gets it from a leading `HISTORY=N`).
pub(crate) fn is_durable(target: &Target) -> bool {
    target
        .env
        .iter()
        .any(|(k, v)| k == "HISTORY" && v.trim().parse::<u64>().is_ok_and(|n| n > 0))
}

/// Runs `resume` against a durable target (a plain one gets no figures and a note).
pub(crate) async fn resume(
    target: &Target,
    cc: &ClusterConfig,
    msgs: usize,
    tries: usize,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    if !is_durable(target) || target.proto != Proto::Ws {
        println!("{tag} skipped: plain rooms keep no history");
        return Ok((Vec::new(), json!({ "skipped": "not durable" })));
    }
    // Enough history for the whole resume.
    let mut target = target.clone();
    for (k, v) in &mut target.env {
        if k == "HISTORY" && v.trim().parse::<usize>().is_ok_and(|n| n < msgs) {
            *v = msgs.to_string();
        }
    }
    let cluster = Cluster::start(&target, cc).await?;
    let limit = Duration::from_secs(30);
    let r = tokio::time::timeout(limit, measure(&cluster.addrs, msgs, tries, tag))
        .await
        .ctx(|| format!("resume did not finish within {limit:?}"))??;
    Ok(r)
}

/// `"seq":N` at the start of a delivery frame `{"seq":N,"payload":V}`.
fn frame_seq(frame: &[u8]) -> Option<u64> {
    let rest = frame.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

async fn measure(
    addrs: &[SocketAddr],
    msgs: usize,
    tries: usize,
    tag: &str,
) -> Result<(Vec<Figure>, Value)> {
    let room = "resume";
    let mut a = ws::TextReader::new(
        ws::connect_path(
            addrs[0],
            &format!("/ws?room={room}&positions=1"),
            Proto::Ws,
            None,
            64 * 1024,
        )
        .await?,
    );
    let notice: Value = serde_json::from_slice(a.next_text().await?)
        .ctx(|| "the first frame of a positions=1 socket is not JSON".to_string())?;
    if notice["type"] != "fanout.position" {
        bail!("expected a fanout.position notice first, got {notice}");
    }
    let epoch = notice["epoch"]
        .as_str()
        .ctx(|| format!("no epoch in {notice}"))?
        .to_owned();
    let s0 = notice["seq"].as_u64().unwrap_or(0);
    let last = s0 + msgs as u64;

    let mut frames = Vec::new();
    let mut scratch = Vec::new();
    for q in 0..msgs as u64 {
        ws::push_message(&mut frames, &mut scratch, Proto::Ws, 0, 0, 0, q, 256);
    }
    a.stream()
        .write_all(&frames)
        .await
        .ctx(|| "publishing the messages to resume".to_string())?;
    loop {
        let f = a.next_text().await?;
        if frame_seq(f) == Some(last) {
            break;
        }
    }
    println!("{tag} {msgs} messages stored in room {room} (epoch {epoch}, seq {s0}..{last})");

    let mut samples = Vec::with_capacity(tries);
    let mut notice_ms = Vec::with_capacity(tries);
    for i in 0..tries {
        let addr = addrs[(i + 1) % addrs.len()];
        let t0 = Instant::now();
        let mut b = ws::TextReader::new(
            ws::connect_path(
                addr,
                &format!("/ws?room={room}&positions=1&since={epoch}:{s0}"),
                Proto::Ws,
                None,
                256 * 1024,
            )
            .await?,
        );
        let first: Value = serde_json::from_slice(b.next_text().await?)
            .ctx(|| "the first frame of a resuming socket is not JSON".to_string())?;
        notice_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        if first["type"] != "fanout.resumed" || first["recovered"] != true {
            bail!("the resume was not recovered: {first}");
        }
        let mut count = 0;
        let mut expect = s0 + 1;
        loop {
            let f = b.next_text().await?;
            let seq = frame_seq(f).ctx(|| {
                format!(
                    "not a delivery frame: {}",
                    String::from_utf8_lossy(&f[..f.len().min(80)])
                )
            })?;
            if seq != expect {
                bail!("replay out of order: seq {seq} where {expect} was due");
            }
            count += 1;
            expect += 1;
            if seq == last {
                break;
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{tag} resume {}: {count} messages replayed in {ms:.2} ms (notice after {:.2} ms)",
            i + 1,
            notice_ms[i]
        );
        samples.push(ms);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let max = samples.iter().copied().fold(f64::NAN, f64::max);
    Ok((
        vec![
            fig(
                "resume_ms",
                "resume of N msgs, median (ms)",
                Better::Lower,
                median(&samples),
            ),
            fig(
                "resume_max_ms",
                "resume of N msgs, max (ms)",
                Better::Lower,
                max,
            ),
            fig(
                "resume_notice_ms",
                "until fanout.resumed, median (ms)",
                Better::Lower,
                median(&notice_ms),
            ),
        ],
        json!({ "messages": msgs, "samples_ms": samples, "notice_ms": notice_ms, "epoch": epoch }),
    ))
}
