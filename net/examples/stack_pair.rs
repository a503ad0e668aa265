//! Throughput of the userspace TCP/IP stack alone: a client-mode stack and an accept-mode
//! stack back to back in memory (no WireGuard, no sockets), one TCP flow, all on one thread.
//!
//! ```text
//! cargo run --release -p warren-net --example stack_pair [-- MIB]   # default 1024 MiB
//! ```
//!
//! Prints the goodput and the CPU time the process used (both stacks and both ends of the
//! flow run on this one thread, so this is the cost of two stacks per byte).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use warren_net::stack::{Stack, StackConfig, StackEvent, TcpFlow};

fn main() -> anyhow::Result<()> {
    let mib: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 1024,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(mib))
}

async fn run(mib: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let client = Arc::new(Mutex::new(Stack::new(
        StackConfig::client("100.64.0.2".parse()?),
        start,
    )?));
    let server = Arc::new(Mutex::new(Stack::new(StackConfig::accept(), start)?));
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    let pump = tokio::spawn(pump(client.clone(), server.clone(), accepted_tx));

    let mut flow = {
        let mut stack = client.lock().unwrap();
        let flow = stack.connect_tcp("10.0.0.5:5001".parse()?, Instant::now())?;
        stack.waker().notify_one();
        flow
    };
    let total = mib << 20;
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a; 64 << 10];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            flow.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        flow.shutdown().await?;
        anyhow::Ok(flow)
    });
    let mut server_flow: TcpFlow = accepted.recv().await.expect("the flow was admitted");
    let (cpu_start, wall_start) = (cpu_time(), Instant::now());
    let mut buf = vec![0; 256 << 10];
    let mut received = 0u64;
    loop {
        let n = server_flow.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let (wall, cpu) = (wall_start.elapsed(), cpu_time().saturating_sub(cpu_start));
    writer.await??;
    pump.abort();
    assert_eq!(received, total, "every byte arrived");
    let gbits = received as f64 * 8.0 / wall.as_secs_f64() / 1e9;
    let stats = (
        server.lock().unwrap().stats(),
        client.lock().unwrap().stats(),
    );
    println!(
        "{mib} MiB in {:.2} s: {gbits:.2} Gbit/s, CPU {:.2} s ({:.2} s per GiB); packets: client out {}, server out {}",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / (received as f64 / f64::from(1u32 << 30)),
        stats.1.packets_out,
        stats.0.packets_out,
    );
    Ok(())
}

/// The IO shell's loop, with a wire in memory instead of WireGuard and UDP.
async fn pump(
    client: Arc<Mutex<Stack>>,
    server: Arc<Mutex<Stack>>,
    accepted: mpsc::UnboundedSender<TcpFlow>,
) {
    let (client_waker, server_waker) = (
        client.lock().unwrap().waker(),
        server.lock().unwrap().waker(),
    );
    loop {
        let now = Instant::now();
        let deadline = {
            let (mut c, mut s) = (client.lock().unwrap(), server.lock().unwrap());
            let mut moved = false;
            for _ in 0..64 {
                c.poll(now);
                s.poll(now);
                let mut any = false;
                while let Some(packet) = c.poll_packet() {
                    any = true;
                    s.handle_packet(&packet, now);
                }
                while let Some(packet) = s.poll_packet() {
                    any = true;
                    c.handle_packet(&packet, now);
                }
                if !any {
                    break;
                }
                moved = true;
            }
            while let Some(event) = s.poll_event() {
                if let StackEvent::NewFlow { id, .. } = event {
                    if let Ok(flow) = s.admit_tcp(id) {
                        let _ = accepted.send(flow);
                    }
                }
            }
            while c.poll_event().is_some() {}
            if moved {
                None
            } else {
                Some(
                    [c.poll_timeout(now), s.poll_timeout(now)]
                        .into_iter()
                        .flatten()
                        .min()
                        .unwrap_or(now + Duration::from_secs(60)),
                )
            }
        };
        let Some(deadline) = deadline else {
            tokio::task::yield_now().await;
            continue;
        };
        tokio::select! {
            () = client_waker.notified() => {}
            () = server_waker.notified() => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// User + system CPU time of this process (Linux; zero elsewhere).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}
