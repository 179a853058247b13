//! `wharf top`: a live terminal view of services, instances and the
//! supervisor's decisions, refreshed every second, as `nats top` or k9s.
//!
//! It reads what wharf already publishes: the instances' heartbeats (KV
//! `wharf_instances`) and the supervisors' events (`<prefix>._events`).

use futures_util::StreamExt;
use ratatui::crossterm::event::{self, Event as Input, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, List, ListItem, Row, Table};
use ratatui::Frame;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf::heartbeat::Heartbeat;
use wharf::supervisor::Event;
use wharf::{Client, Error, ErrorKind};

/// Decisions kept for the view.
const EVENTS_KEPT: usize = 50;

/// One service, summed over its instances.
#[derive(Default)]
struct ServiceRow {
    instances: usize,
    calls_per_s: f64,
    /// Calls-weighted mean of the instances' medians.
    p50_ms: f64,
    /// The slowest instance's.
    p99_ms: f64,
    errors_per_s: f64,
    cpu: f32,
    rss: u64,
    in_flight: usize,
    backlog: usize,
    transactions: usize,
}

/// What the view shows, rebuilt each refresh.
struct View {
    url: String,
    prefix: String,
    instances: Vec<Heartbeat>,
    services: BTreeMap<String, ServiceRow>,
    events: Vec<Event>,
    /// Why the last refresh failed, if it did.
    trouble: Option<String>,
}

/// Runs the view until `q`, Esc or Ctrl-C.
pub(crate) async fn top(client: &Client, every: Duration) -> Result<ExitCode, Error> {
    let events = Arc::new(Mutex::new(VecDeque::new()));
    let heard = events.clone();
    let subject = wharf::wire::subjects::events(client.prefix());
    let mut subscription = client.nats().subscribe(subject).await.map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("cannot subscribe for events: {e}"),
        )
        .with_source(e)
    })?;
    let listener = tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Ok(event) = serde_json::from_slice::<Event>(&message.payload) {
                let mut events = heard.lock().unwrap_or_else(|e| e.into_inner());
                events.push_front(event);
                events.truncate(EVENTS_KEPT);
            }
        }
    });
    // Keys are read on a thread of their own: crossterm's read blocks.
    let (keys, mut pressed) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        match event::read() {
            Ok(Input::Key(key)) if key.kind == KeyEventKind::Press => {
                if keys.send(key).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    });
    let mut terminal = ratatui::init();
    let mut errors_before: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut ticker = tokio::time::interval(every);
    let outcome = loop {
        tokio::select! {
            _ = ticker.tick() => {
                let (instances, trouble) = match wharf::supervisor::instances(client).await {
                    Ok(instances) => (instances, None),
                    Err(error) => (Vec::new(), Some(error.to_string())),
                };
                let services = summarize(&instances, &mut errors_before);
                let view = View {
                    url: client.url().to_owned(),
                    prefix: client.prefix().to_owned(),
                    instances,
                    services,
                    events: events.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect(),
                    trouble,
                };
                if let Err(e) = terminal.draw(|frame| draw(frame, &view, every)) {
                    break Err(Error::new(ErrorKind::Process, format!("cannot draw on the terminal: {e}")));
                }
            }
            key = pressed.recv() => match key {
                Some(key) if quits(&key) => break Ok(ExitCode::SUCCESS),
                Some(_) => {}
                None => break Ok(ExitCode::SUCCESS),
            },
        }
    };
    ratatui::restore();
    listener.abort();
    outcome
}

fn quits(key: &event::KeyEvent) -> bool {
    matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
        || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
}

/// Sums the instances by service; errors per second from each instance's
/// error count since the last refresh.
fn summarize(
    instances: &[Heartbeat],
    errors_before: &mut HashMap<String, (u64, Instant)>,
) -> BTreeMap<String, ServiceRow> {
    let mut services: BTreeMap<String, ServiceRow> = BTreeMap::new();
    let now = Instant::now();
    for beat in instances {
        let errors_per_s = match errors_before.insert(beat.instance.clone(), (beat.errors, now)) {
            Some((before, at)) if beat.errors >= before => {
                (beat.errors - before) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
            }
            _ => 0.0,
        };
        for name in &beat.services {
            let row = services.entry(name.clone()).or_default();
            let weight = row.calls_per_s + beat.calls_per_s;
            if weight > 0.0 {
                row.p50_ms =
                    (row.p50_ms * row.calls_per_s + beat.p50_ms * beat.calls_per_s) / weight;
            }
            row.instances += 1;
            row.calls_per_s = weight;
            row.p99_ms = row.p99_ms.max(beat.p99_ms);
            row.errors_per_s += errors_per_s;
            row.cpu += beat.cpu;
            row.rss += beat.rss;
            row.in_flight += beat.in_flight;
            row.backlog += beat.backlog;
            row.transactions += beat.transactions;
        }
    }
    errors_before.retain(|instance, _| instances.iter().any(|b| &b.instance == instance));
    services
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn draw(frame: &mut Frame, view: &View, every: Duration) {
    let [title, services, instances, events] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(view.services.len() as u16 + 3),
        Constraint::Min(5),
        Constraint::Length(10),
    ])
    .areas(frame.area());
    let status = match &view.trouble {
        Some(trouble) => format!("  ({trouble})"),
        None => String::new(),
    };
    frame.render_widget(
        Line::from(format!(
            "wharf top  {}  prefix {}  {} instances  every {:?}  q quits{status}",
            view.url,
            view.prefix,
            view.instances.len(),
            every
        ))
        .bold(),
        title,
    );
    let header = |cells: &[&'static str]| {
        Row::new(cells.to_vec())
            .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED))
    };
    let rows = view.services.iter().map(|(name, row)| {
        Row::new(vec![
            name.clone(),
            row.instances.to_string(),
            format!("{:.1}", row.calls_per_s),
            format!("{:.3}", row.p50_ms),
            format!("{:.3}", row.p99_ms),
            format!("{:.1}", row.errors_per_s),
            format!("{:.1}", row.cpu),
            mib(row.rss),
            row.in_flight.to_string(),
            row.backlog.to_string(),
            row.transactions.to_string(),
        ])
    });
    let widths = [
        Constraint::Min(14),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(5),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header(&[
                "service",
                "instances",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "errors/s",
                "CPU%",
                "RSS MiB",
                "in-flight",
                "backlog",
                "txns",
            ]))
            .block(Block::default().borders(Borders::ALL).title(" services ")),
        services,
    );
    let rows = view.instances.iter().map(|beat| {
        Row::new(vec![
            beat.instance.clone(),
            beat.services.join(","),
            beat.host.clone(),
            match &beat.container {
                Some(container) => container.chars().take(12).collect(),
                None => beat.pid.to_string(),
            },
            format!("{:.1}", beat.calls_per_s),
            format!("{:.3}", beat.p50_ms),
            format!("{:.3}", beat.p99_ms),
            format!("{:.1}", beat.cpu),
            mib(beat.rss),
            beat.in_flight.to_string(),
            beat.backlog.to_string(),
            beat.transactions.to_string(),
            if beat.draining { "draining" } else { "ok" }.to_owned(),
        ])
    });
    let widths = [
        Constraint::Min(24),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(8),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header(&[
                "instance",
                "services",
                "host",
                "pid/cont.",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "CPU%",
                "RSS MiB",
                "in-flight",
                "backlog",
                "txns",
                "state",
            ]))
            .block(Block::default().borders(Borders::ALL).title(" instances ")),
        instances,
    );
    let items = view.events.iter().map(|event| {
        let seconds = event.at_ms / 1000;
        ListItem::new(format!(
            "{:02}:{:02}:{:02} {:<10} {:<14} {}",
            seconds / 3600 % 24,
            seconds / 60 % 60,
            seconds % 60,
            event.kind.to_string(),
            event.service.as_deref().unwrap_or("-"),
            event.reason
        ))
    });
    frame.render_widget(
        List::new(items).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" supervisor decisions (newest first, UTC) "),
        ),
        events,
    );
}
