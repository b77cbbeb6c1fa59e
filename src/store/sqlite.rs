//! The embedded store: SQLite in WAL mode with `synchronous=FULL`, so a commit is on disk
//! (fsync'd) before it returns.
//!
//! One writer thread owns the write connection. It takes every write waiting in its
//! channel, applies them in one transaction and commits once: concurrent publishes share
//! one fsync (group commit), and delivery outcomes are committed in the same batches.
//! Writes are set-based: a publish's fan-out rows and a run of outcomes are written in
//! chunks of many rows per statement execution (`SetStatement`), not a statement per row.
//! Outcomes are not awaited by the workers; instead each worker waits for its own
//! records to commit once it has `super::UNCOMMITTED_OUTCOMES_PER_SUBSCRIPTION` of them in
//! flight, which bounds what a crash can make a subscription see again.
//!
//! Reads go through a second connection (WAL readers never block the writer).
//! An exclusive lock on `herald.lock` in the store directory keeps a second herald out.

use super::{
    Attempt, AttemptResult, Counters, DeadLetter, EventStore, Exchange, Fanout, LOGGED_ATTEMPTS, Limits, LoggedAttempt,
    MINUTES_KEPT, Millis, MinuteCount, NewEvent, Outcome, Queued, StoreError, WatchPage, WatchPosition, minute_of,
    now_millis,
};
use futures::future::BoxFuture;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, ToSql, Transaction, params};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use tokio::sync::{oneshot, watch};

/// Most writes the writer folds into one transaction.
const MAX_BATCH: usize = 4096;

const DATABASE_FILE: &str = "herald.db";
const LOCK_FILE: &str = "herald.lock";

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    refs INTEGER NOT NULL,
    published_at INTEGER NOT NULL
);
CREATE TABLE subscriptions (
    subscription_id INTEGER PRIMARY KEY,
    next_distribution_id INTEGER NOT NULL DEFAULT 1,
    next_position INTEGER NOT NULL DEFAULT 1,
    pending INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    failure INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_delivery_at INTEGER
);
CREATE TABLE queue (
    subscription_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    distribution_id INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, position)
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    subscription_id INTEGER NOT NULL,
    distribution_id INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    dead_at INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, distribution_id)
) WITHOUT ROWID;
CREATE INDEX dead_letters_by_age ON dead_letters (dead_at);
"#,
    r#"
ALTER TABLE subscriptions ADD COLUMN logged INTEGER NOT NULL DEFAULT 0;
CREATE TABLE attempt_log (
    subscription_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    distribution_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    result TEXT NOT NULL,
    error TEXT NOT NULL,
    http_status INTEGER,
    latency_ms INTEGER,
    answer_head TEXT NOT NULL,
    PRIMARY KEY (subscription_id, seq)
) WITHOUT ROWID;
CREATE TABLE attempt_minutes (
    subscription_id INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, minute)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE watches (
    watch TEXT PRIMARY KEY,
    cursor TEXT NOT NULL,
    events_read INTEGER NOT NULL,
    pre_images INTEGER NOT NULL DEFAULT 0,
    next_touch INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE pre_images (
    watch TEXT NOT NULL,
    instance TEXT NOT NULL,
    detail TEXT NOT NULL,
    touched INTEGER NOT NULL,
    PRIMARY KEY (watch, instance)
) WITHOUT ROWID;
CREATE INDEX pre_images_by_age ON pre_images (watch, touched);
"#,
];

/// A subscription's next queue entries, the read every worker makes per page.
const QUEUED_SQL: &str = "SELECT q.position, q.event_id, q.distribution_id, q.attempts, q.enqueued_at, e.body
     FROM queue q JOIN events e ON e.id = q.event_id
     WHERE q.subscription_id = ?1 AND q.position > ?2 ORDER BY q.position LIMIT ?3";

/// A statement over a set of rows: `{rows}` in `sql` stands for a VALUES list of `row`s.
/// A set of rows is cut into chunks of `CHUNK_SIZES`, largest first, so each statement is
/// prepared once per size and reused, and a chunk of rows costs one execution. Their plans
/// must look rows up by key, never scan a table (`set_statements_look_rows_up_by_key`).
struct SetStatement {
    sql: &'static str,
    /// One row's placeholders, such as `(?,?,0,?)`.
    row: &'static str,
    /// Values per row: the `?`s in `row`.
    width: usize,
    /// The SQL for each chunk size, made once.
    by_size: [OnceLock<String>; CHUNK_SIZES.len()],
}

const CHUNK_SIZES: [usize; 4] = [256, 32, 4, 1];

impl SetStatement {
    const fn new(sql: &'static str, row: &'static str) -> Self {
        let (bytes, mut width, mut i) = (row.as_bytes(), 0, 0);
        while i < bytes.len() {
            if bytes[i] == b'?' {
                width += 1;
            }
            i += 1;
        }
        SetStatement { sql, row, width, by_size: [const { OnceLock::new() }; CHUNK_SIZES.len()] }
    }

    fn sql(&self, size_index: usize) -> &str {
        self.by_size[size_index].get_or_init(|| {
            let rows = vec![self.row; CHUNK_SIZES[size_index]].join(",");
            self.sql.replace("{rows}", &rows)
        })
    }

    /// Runs the statement over `values` (rows of `width` values, flattened), chunk by
    /// chunk; `each` sees every row a SELECT answers.
    fn run(
        &self,
        conn: &Connection,
        values: &[&dyn ToSql],
        mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<(), rusqlite::Error>,
    ) -> Result<(), StoreError> {
        let width = self.width;
        let mut rest = values;
        for (size_index, size) in CHUNK_SIZES.iter().enumerate() {
            while rest.len() >= size * width {
                let (chunk, tail) = rest.split_at(size * width);
                let mut stmt = conn.prepare_cached(self.sql(size_index))?;
                let mut rows = stmt.query(rusqlite::params_from_iter(chunk))?;
                while let Some(row) = rows.next()? {
                    each(row)?;
                }
                rest = tail;
            }
        }
        Ok(())
    }

    fn execute(&self, conn: &Connection, values: &[&dyn ToSql]) -> Result<(), StoreError> {
        self.run(conn, values, |_| Ok(()))
    }
}

static ENSURE_SUBSCRIPTIONS: SetStatement =
    SetStatement::new("INSERT OR IGNORE INTO subscriptions (subscription_id) VALUES {rows}", "(?)");
static NEXT_POSITIONS: SetStatement = SetStatement::new(
    "SELECT subscription_id, next_distribution_id, next_position, pending FROM subscriptions
     WHERE subscription_id IN (VALUES {rows})",
    "(?)",
);
static ENQUEUE: SetStatement = SetStatement::new(
    "INSERT INTO queue (subscription_id, position, event_id, distribution_id, attempts, enqueued_at) VALUES {rows}",
    "(?,?,?,?,0,?)",
);
static OVERFLOW: SetStatement = SetStatement::new(
    "INSERT INTO dead_letters (subscription_id, distribution_id, event_id, attempts, reason, error, dead_at)
     VALUES {rows}",
    "(?,?,?,0,'BacklogFull',?,?)",
);
static ADVANCE: SetStatement = SetStatement::new(
    "UPDATE subscriptions SET next_distribution_id = v.column2, next_position = v.column3, pending = v.column4,
         dead_lettered = dead_lettered + v.column5
     FROM (VALUES {rows}) AS v WHERE subscriptions.subscription_id = v.column1",
    "(?,?,?,?,?)",
);
static OUTCOME_ROWS: SetStatement = SetStatement::new(
    "SELECT q.subscription_id, q.position, q.event_id, q.distribution_id, q.attempts
     FROM (VALUES {rows}) AS v JOIN queue q ON q.subscription_id = v.column1 AND q.position = v.column2",
    "(?,?)",
);
static SETTLE: SetStatement =
    SetStatement::new("DELETE FROM queue WHERE (subscription_id, position) IN (VALUES {rows})", "(?,?)");
static RETRIED: SetStatement = SetStatement::new(
    "UPDATE queue SET attempts = attempts + v.column3 FROM (VALUES {rows}) AS v
     WHERE queue.subscription_id = v.column1 AND queue.position = v.column2",
    "(?,?,?)",
);
static DEAD_LETTERS: SetStatement = SetStatement::new(
    "INSERT OR REPLACE INTO dead_letters (subscription_id, distribution_id, event_id, attempts, reason, error, dead_at)
     VALUES {rows}",
    "(?,?,?,?,?,?,?)",
);
static COUNTERS: SetStatement = SetStatement::new(
    "UPDATE subscriptions SET total = total + v.column2, failure = failure + v.column3,
         delivered = delivered + v.column4, dead_lettered = dead_lettered + v.column5, pending = pending - v.column6,
         consecutive_failures = CASE WHEN v.column7 THEN v.column8 ELSE consecutive_failures + v.column8 END,
         last_error = COALESCE(v.column9, last_error), last_delivery_at = COALESCE(v.column10, last_delivery_at),
         logged = logged + v.column11
     FROM (VALUES {rows}) AS v WHERE subscriptions.subscription_id = v.column1",
    "(?,?,?,?,?,?,?,?,?,?,?)",
);
static LOGGED: SetStatement = SetStatement::new(
    "SELECT subscription_id, logged FROM subscriptions WHERE subscription_id IN (VALUES {rows})",
    "(?)",
);
static LOG: SetStatement = SetStatement::new(
    "INSERT INTO attempt_log (subscription_id, seq, at, distribution_id, attempt, result, error, http_status,
         latency_ms, answer_head) VALUES {rows}",
    "(?,?,?,?,?,?,?,?,?,?)",
);
/// Drops each subscription's log entries up to a sequence number.
static LOG_TRIM: SetStatement = SetStatement::new(
    "DELETE FROM attempt_log WHERE (subscription_id, seq) IN
         (SELECT l.subscription_id, l.seq FROM (VALUES {rows}) AS v
          JOIN attempt_log l ON l.subscription_id = v.column1 AND l.seq <= v.column2)",
    "(?,?)",
);
static MINUTES: SetStatement = SetStatement::new(
    "INSERT INTO attempt_minutes (subscription_id, minute, attempts, failures) VALUES {rows}
     ON CONFLICT (subscription_id, minute) DO UPDATE
         SET attempts = attempts + excluded.attempts, failures = failures + excluded.failures",
    "(?,?,?,?)",
);
/// Drops each subscription's per-minute counts more than a number of minutes older than its
/// newest.
static MINUTES_TRIM: SetStatement = SetStatement::new(
    "DELETE FROM attempt_minutes WHERE (subscription_id, minute) IN
         (SELECT m.subscription_id, m.minute FROM (VALUES {rows}) AS v
          JOIN attempt_minutes m ON m.subscription_id = v.column1
              AND m.minute <= (SELECT max(n.minute) FROM attempt_minutes n WHERE n.subscription_id = v.column1)
                  - v.column2)",
    "(?,?)",
);
static RELEASE: SetStatement = SetStatement::new(
    "UPDATE events SET refs = refs - v.column2 FROM (VALUES {rows}) AS v WHERE events.id = v.column1",
    "(?,?)",
);
static DROP_RELEASED: SetStatement =
    SetStatement::new("DELETE FROM events WHERE id IN (VALUES {rows}) AND refs <= 0", "(?)");

/// Whether SQLite failed because the disk (or the database's page limit) is full.
fn disk_full(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        if disk_full(&error) { StoreError::Full { detail: error.to_string() } } else { StoreError::Query(error.into()) }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Write {
    Publish { events: Vec<NewEvent>, reply: Reply<Vec<Vec<Fanout>>> },
    Record { ticket: u64, attempt: Attempt },
    Replay { subscription_id: i64, distribution_ids: Option<Vec<i64>>, reply: Reply<usize> },
    Drop { subscription_id: i64, reply: Reply<()> },
    Expire { before: Millis, reply: Reply<usize> },
    Ingest { page: WatchPage, reply: Reply<Vec<Vec<Fanout>>> },
    DropWatch { watch: String, reply: Reply<()> },
}

pub struct SqliteStore {
    writes: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
    next_ticket: parking_lot::Mutex<u64>,
    committed: watch::Receiver<u64>,
    size: Arc<AtomicU64>,
    /// Subscriptions with an outcome whose write failed, until their worker asks.
    lost_outcomes: Arc<parking_lot::Mutex<HashSet<i64>>>,
    durability: (String, i64),
    _lock: File,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let shown = path.display().to_string();
    let open_error = |source: rusqlite::Error| StoreError::Open { path: shown.clone(), source: source.into() };
    let conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(open_error)?;
    // Query-planner stability: otherwise SQLite plans `LIMIT ?` with the bound value and
    // expires the cached statement each time that parameter is bound, so every queue read
    // re-prepared its statement (a quarter of herald's instructions at a fan-out of 1,000;
    // BENCHMARKS.md). With it, plans never depend on bound values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(open_error)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        let version = i64::try_from(index + 1).unwrap_or(i64::MAX);
        let migrate_error = |source: rusqlite::Error| StoreError::Migrate { version, source: source.into() };
        let tx = conn.transaction().map_err(migrate_error)?;
        tx.execute_batch(sql).map_err(migrate_error)?;
        tx.pragma_update(None, "user_version", version).map_err(migrate_error)?;
        tx.commit().map_err(migrate_error)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `directory` and starts its writer thread.
    pub fn open(directory: &Path, limits: Limits) -> Result<Self, StoreError> {
        Self::open_with_page_limit(directory, limits, None)
    }

    /// `max_pages` caps the database as a full disk would (tests only).
    fn open_with_page_limit(directory: &Path, limits: Limits, max_pages: Option<i64>) -> Result<Self, StoreError> {
        let shown = directory.display().to_string();
        std::fs::create_dir_all(directory).map_err(|source| StoreError::CreateDir { path: shown.clone(), source })?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(directory.join(LOCK_FILE))
            .map_err(|source| StoreError::Lock { path: shown.clone(), source })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked { path: shown }),
            Err(std::fs::TryLockError::Error(source)) => return Err(StoreError::Lock { path: shown, source }),
        }

        let db = directory.join(DATABASE_FILE);
        let mut writer = open_connection(&db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
        // Every set statement in every chunk size stays prepared (rusqlite keeps 16).
        writer.set_prepared_statement_cache_capacity(128);
        // WAL + FULL: every commit fsyncs the WAL before returning.
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "FULL")?;
        // Truncate the WAL back to 64 MiB after checkpoints, so disk use follows the data.
        writer.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        migrate(&mut writer)?;
        if let Some(pages) = max_pages {
            writer.pragma_update(None, "max_page_count", pages)?;
        }
        let durability = (
            writer.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))?,
            writer.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?,
        );
        let reader = open_connection(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;

        let (writes, queue) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(0);
        let size = Arc::new(AtomicU64::new(0));
        let lost_outcomes = Arc::default();
        let mut writer_state =
            Writer { conn: writer, limits, size: size.clone(), lost_outcomes: Arc::clone(&lost_outcomes) };
        writer_state.measure();
        std::thread::Builder::new()
            .name("herald-store-writer".into())
            .spawn(move || writer_state.run(&queue, &committed_tx))
            .map_err(|source| StoreError::Lock { path: shown, source })?;

        Ok(SqliteStore {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            next_ticket: parking_lot::Mutex::new(1),
            committed,
            size,
            lost_outcomes,
            durability,
            _lock: lock,
        })
    }

    /// The writer connection's journal mode and `synchronous` level, read back after
    /// opening: ("wal", 2 = FULL) is what makes a commit durable when it returns.
    pub fn durability(&self) -> (&str, i64) {
        (&self.durability.0, self.durability.1)
    }

    async fn ask<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes.send(make(reply)).map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| StoreError::WriterStopped)?;
            query(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::WriterStopped)?
    }
}

impl EventStore for SqliteStore {
    fn publish(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        Box::pin(self.ask(|reply| Write::Publish { events, reply }))
    }

    fn queued(
        &self,
        subscription_id: i64,
        after_position: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Queued>, StoreError>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(QUEUED_SQL)?;
            let rows = stmt.query_map(params![subscription_id, after_position, limit], |r| {
                Ok(Queued {
                    subscription_id,
                    position: r.get(0)?,
                    event_id: r.get(1)?,
                    distribution_id: r.get(2)?,
                    attempts: r.get(3)?,
                    enqueued_at: r.get(4)?,
                    body: r.get(5)?,
                })
            })?;
            rows.collect()
        }))
    }

    fn record_attempt(&self, attempt: Attempt) -> Result<u64, StoreError> {
        // Numbered and queued under one lock: the writer must see tickets in order, or a
        // later ticket's commit would claim an earlier one durable before it is written.
        let mut next_ticket = self.next_ticket.lock();
        let ticket = *next_ticket;
        self.writes.send(Write::Record { ticket, attempt }).map_err(|_| StoreError::WriterStopped)?;
        *next_ticket += 1;
        Ok(ticket)
    }

    fn committed(&self, ticket: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut committed = self.committed.clone();
        Box::pin(async move {
            committed.wait_for(|done| *done >= ticket).await.map(|_| ()).map_err(|_| StoreError::WriterStopped)
        })
    }

    fn settled(&self) -> u64 {
        *self.committed.borrow()
    }

    fn counters(&self, subscription_id: i64) -> BoxFuture<'_, Result<Counters, StoreError>> {
        Box::pin(self.read(move |conn| {
            conn.query_row(
                "SELECT total, failure, delivered, dead_lettered, pending, consecutive_failures, last_error, last_delivery_at
                 FROM subscriptions WHERE subscription_id = ?1",
                [subscription_id],
                |r| {
                    Ok(Counters {
                        total: r.get(0)?,
                        failure: r.get(1)?,
                        delivered: r.get(2)?,
                        dead_lettered: r.get(3)?,
                        pending: r.get(4)?,
                        consecutive_failures: r.get(5)?,
                        last_error: r.get(6)?,
                        last_delivery_at: r.get(7)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
        }))
    }

    fn dead_letters(&self, subscription_id: i64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, StoreError>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT d.distribution_id, d.event_id, d.attempts, d.reason, d.error, d.dead_at, e.body
                 FROM dead_letters d JOIN events e ON e.id = d.event_id
                 WHERE d.subscription_id = ?1 ORDER BY d.distribution_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![subscription_id, limit], |r| {
                Ok(DeadLetter {
                    subscription_id,
                    distribution_id: r.get(0)?,
                    event_id: r.get(1)?,
                    attempts: r.get(2)?,
                    reason: r.get(3)?,
                    error: r.get(4)?,
                    dead_at: r.get(5)?,
                    body: r.get(6)?,
                })
            })?;
            rows.collect()
        }))
    }

    fn delivery_log(
        &self,
        subscription_id: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<LoggedAttempt>, StoreError>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at, distribution_id, attempt, result, error, http_status, latency_ms, answer_head
                 FROM attempt_log WHERE subscription_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![subscription_id, limit], |r| {
                let result: String = r.get(3)?;
                Ok(LoggedAttempt {
                    at: r.get(0)?,
                    distribution_id: r.get(1)?,
                    attempt: r.get(2)?,
                    // Only this module writes the column, from AttemptResult::as_str.
                    result: AttemptResult::parse(&result).unwrap_or(AttemptResult::Failed),
                    error: r.get(4)?,
                    exchange: Exchange { http_status: r.get(5)?, latency_ms: r.get(6)?, answer_head: r.get(7)? },
                })
            })?;
            rows.collect()
        }))
    }

    fn attempts_per_minute(
        &self,
        subscription_id: i64,
        minutes: std::ops::RangeInclusive<i64>,
    ) -> BoxFuture<'_, Result<Vec<MinuteCount>, StoreError>> {
        let (first, last) = minutes.into_inner();
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT minute, attempts, failures FROM attempt_minutes
                 WHERE subscription_id = ?1 AND minute BETWEEN ?2 AND ?3 ORDER BY minute",
            )?;
            let rows = stmt.query_map(params![subscription_id, first, last], |r| {
                Ok(MinuteCount { minute: r.get(0)?, attempts: r.get(1)?, failures: r.get(2)? })
            })?;
            rows.collect()
        }))
    }

    fn replay(
        &self,
        subscription_id: i64,
        distribution_ids: Option<Vec<i64>>,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.ask(move |reply| Write::Replay { subscription_id, distribution_ids, reply }))
    }

    fn drop_subscription(&self, subscription_id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ask(move |reply| Write::Drop { subscription_id, reply }))
    }

    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<i64>, StoreError>> {
        Box::pin(self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT subscription_id FROM subscriptions ORDER BY subscription_id")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        }))
    }

    fn expire_dead_letters(&self, before: Millis) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.ask(move |reply| Write::Expire { before, reply }))
    }

    fn watch_position(&self, watch: &str) -> BoxFuture<'_, Result<Option<WatchPosition>, StoreError>> {
        let watch = watch.to_string();
        Box::pin(self.read(move |conn| {
            conn.prepare_cached("SELECT cursor, events_read, pre_images FROM watches WHERE watch = ?1")?
                .query_row([watch], |r| {
                    Ok(WatchPosition { cursor: r.get(0)?, events_read: r.get(1)?, pre_images: r.get(2)? })
                })
                .optional()
        }))
    }

    fn ingest(&self, page: WatchPage) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        Box::pin(self.ask(|reply| Write::Ingest { page, reply }))
    }

    fn pre_images(
        &self,
        watch: &str,
        instances: Vec<String>,
    ) -> BoxFuture<'_, Result<HashMap<String, String>, StoreError>> {
        let watch = watch.to_string();
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT detail FROM pre_images WHERE watch = ?1 AND instance = ?2")?;
            let mut found = HashMap::new();
            for instance in instances {
                if let Some(detail) = stmt.query_row(params![watch, instance], |r| r.get::<_, String>(0)).optional()? {
                    found.insert(instance, detail);
                }
            }
            Ok(found)
        }))
    }

    fn drop_watch(&self, watch: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let watch = watch.to_string();
        Box::pin(self.ask(move |reply| Write::DropWatch { watch, reply }))
    }

    fn watches(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT watch FROM watches")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        }))
    }

    fn pending_total(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(
            self.read(|conn| conn.query_row("SELECT COALESCE(SUM(pending), 0) FROM subscriptions", [], |r| r.get(0))),
        )
    }

    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn outcomes_lost(&self, subscription_id: i64) -> bool {
        self.lost_outcomes.lock().remove(&subscription_id)
    }
}

struct Writer {
    conn: Connection,
    limits: Limits,
    size: Arc<AtomicU64>,
    lost_outcomes: Arc<parking_lot::Mutex<HashSet<i64>>>,
}

/// An answer to send once the transaction it belongs to has committed.
enum Pending {
    Published(Reply<Vec<Vec<Fanout>>>, Result<Vec<Vec<Fanout>>, StoreError>),
    Replayed(Reply<usize>, Result<usize, StoreError>),
    Dropped(Reply<()>, Result<(), StoreError>),
    Expired(Reply<usize>, Result<usize, StoreError>),
}

/// Why a batch as a whole is not durable: every write in it that had succeeded is
/// answered with this instead.
#[derive(Clone, Debug)]
enum BatchFailure {
    /// The disk is full: answered as the quota is (503, retry later).
    Full(String),
    Other(String),
}

impl BatchFailure {
    fn of(error: &rusqlite::Error) -> Self {
        if disk_full(error) { BatchFailure::Full(error.to_string()) } else { BatchFailure::Other(error.to_string()) }
    }

    fn to_error(&self) -> StoreError {
        match self {
            BatchFailure::Full(detail) => StoreError::Full { detail: detail.clone() },
            BatchFailure::Other(detail) => StoreError::Commit(detail.clone()),
        }
    }
}

impl std::fmt::Display for BatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchFailure::Full(detail) | BatchFailure::Other(detail) => f.write_str(detail),
        }
    }
}

impl Pending {
    /// Sends the answer, or the batch's failure for every success when it failed.
    fn send(self, commit_failed: Option<&BatchFailure>) {
        fn answer<T>(reply: Reply<T>, result: Result<T, StoreError>, failed: Option<&BatchFailure>) {
            let result = match (result, failed) {
                (Ok(_), Some(failure)) => Err(failure.to_error()),
                (result, _) => result,
            };
            // A caller that stopped waiting needs no answer.
            drop(reply.send(result));
        }
        match self {
            Pending::Published(reply, result) => answer(reply, result, commit_failed),
            Pending::Replayed(reply, result) => answer(reply, result, commit_failed),
            Pending::Dropped(reply, result) => answer(reply, result, commit_failed),
            Pending::Expired(reply, result) => answer(reply, result, commit_failed),
        }
    }
}

impl Writer {
    fn run(&mut self, queue: &mpsc::Receiver<Write>, committed: &watch::Sender<u64>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let highest_ticket = batch
                .iter()
                .filter_map(|write| match write {
                    Write::Record { ticket, .. } => Some(*ticket),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let (answers, result) = self.apply_batch(batch);
            let failure = result.err();
            if let Some(error) = &failure {
                tracing::error!(%error, "store commit failed; the batch is not durable");
            }
            for pending in answers {
                pending.send(failure.as_ref());
            }
            // Settled, written or not: the outcomes of a failed batch are reported lost
            // (`outcomes_lost`) before this, so nobody waits for a commit that never comes.
            if highest_ticket > 0 {
                committed.send_if_modified(|done| {
                    let moved = highest_ticket > *done;
                    *done = (*done).max(highest_ticket);
                    moved
                });
            }
            self.measure();
        }
    }

    fn apply_batch(&mut self, batch: Vec<Write>) -> (Vec<Pending>, Result<(), BatchFailure>) {
        let over_quota = self.over_quota();
        let mut answers = Vec::with_capacity(batch.len());
        let tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(error) => {
                let failure = BatchFailure::of(&error);
                for write in batch {
                    fail_write(write, &failure, &self.lost_outcomes);
                }
                return (answers, Err(failure));
            }
        };
        let now = now_millis();
        let mut recorded = Vec::new();
        // A full disk seen by any write: SQLite then rolls the whole transaction back.
        let mut full: Option<String> = None;
        let mut writes = batch.into_iter().peekable();
        while let Some(write) = writes.next() {
            if tx.is_autocommit() {
                // SQLite rolled the transaction back itself: nothing of this batch is
                // written, so nothing may be answered as written, and the rest must not run
                // outside a transaction.
                let failure = rolled_back(full.take());
                fail_write(write, &failure, &self.lost_outcomes);
                for write in writes {
                    fail_write(write, &failure, &self.lost_outcomes);
                }
                self.lost_outcomes.lock().extend(recorded);
                return (answers, Err(failure));
            }
            match write {
                Write::Publish { events, reply } => {
                    let result = match over_quota {
                        Some((size, quota)) => Err(StoreError::OverQuota { size, quota }),
                        None => in_savepoint(&tx, |sp| publish(sp, &events, self.limits.backlog_cap, now)),
                    };
                    note_full(&result, &mut full);
                    answers.push(Pending::Published(reply, result));
                }
                Write::Record { attempt, .. } => {
                    // The run of outcomes up to the next other write, applied as one set.
                    let mut run = vec![attempt];
                    while let Some(Write::Record { .. }) = writes.peek() {
                        if let Some(Write::Record { attempt, .. }) = writes.next() {
                            run.push(attempt);
                        }
                    }
                    let subscriptions = run.iter().map(|attempt| attempt.subscription_id);
                    recorded.extend(subscriptions.clone());
                    let result = in_savepoint(&tx, |sp| record(sp, &run));
                    note_full(&result, &mut full);
                    if let Err(error) = result {
                        tracing::error!(%error, outcomes = run.len(), "recording delivery attempts failed");
                        self.lost_outcomes.lock().extend(subscriptions);
                    }
                }
                Write::Replay { subscription_id, distribution_ids, reply } => {
                    let result = in_savepoint(&tx, |sp| replay(sp, subscription_id, distribution_ids.as_deref(), now));
                    note_full(&result, &mut full);
                    answers.push(Pending::Replayed(reply, result));
                }
                Write::Drop { subscription_id, reply } => {
                    let result = in_savepoint(&tx, |sp| drop_subscription(sp, subscription_id));
                    note_full(&result, &mut full);
                    answers.push(Pending::Dropped(reply, result));
                }
                Write::Expire { before, reply } => {
                    let result = in_savepoint(&tx, |sp| expire(sp, before));
                    note_full(&result, &mut full);
                    answers.push(Pending::Expired(reply, result));
                }
                Write::Ingest { page, reply } => {
                    let result = match over_quota {
                        Some((size, quota)) if page.grows_store() => Err(StoreError::OverQuota { size, quota }),
                        _ => in_savepoint(&tx, |sp| ingest(sp, &page, self.limits.backlog_cap, now)),
                    };
                    note_full(&result, &mut full);
                    answers.push(Pending::Published(reply, result));
                }
                Write::DropWatch { watch, reply } => {
                    let result = in_savepoint(&tx, |sp| drop_watch(sp, &watch));
                    note_full(&result, &mut full);
                    answers.push(Pending::Dropped(reply, result));
                }
            }
        }
        if tx.is_autocommit() {
            self.lost_outcomes.lock().extend(recorded);
            return (answers, Err(rolled_back(full)));
        }
        let result = tx.commit().map_err(|error| BatchFailure::of(&error));
        if result.is_err() {
            self.lost_outcomes.lock().extend(recorded);
        }
        (answers, result)
    }

    /// (size, quota) when the store is over its quota.
    fn over_quota(&self) -> Option<(u64, u64)> {
        let size = self.size.load(Ordering::Relaxed);
        (size > self.limits.quota_bytes).then_some((size, self.limits.quota_bytes))
    }

    /// The live data's size: pages in use, as this connection sees the database
    /// (including what is still only in the WAL). Files on disk never shrink, so
    /// measuring them would keep a drained store over its quota for ever.
    fn measure(&self) {
        let pragma =
            |name: &str| self.conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0)).unwrap_or(0);
        let in_use = pragma("page_count").saturating_sub(pragma("freelist_count")).saturating_mul(pragma("page_size"));
        self.size.store(u64::try_from(in_use).unwrap_or(0), Ordering::Relaxed);
    }
}

fn note_full<T>(result: &Result<T, StoreError>, full: &mut Option<String>) {
    if let Err(StoreError::Full { detail }) = result {
        *full = Some(detail.clone());
    }
}

/// Why a batch whose transaction SQLite rolled back failed: a full disk when a write saw
/// one (answered like the quota), otherwise a store failure.
fn rolled_back(full: Option<String>) -> BatchFailure {
    match full {
        Some(detail) => BatchFailure::Full(detail),
        None => BatchFailure::Other("the store's transaction was rolled back".into()),
    }
}

/// Answers a write of a batch that failed as a whole; a record's outcome is lost.
fn fail_write(write: Write, failure: &BatchFailure, lost_outcomes: &parking_lot::Mutex<HashSet<i64>>) {
    let error = || failure.to_error();
    match write {
        Write::Publish { reply, .. } => drop(reply.send(Err(error()))),
        Write::Replay { reply, .. } => drop(reply.send(Err(error()))),
        Write::Drop { reply, .. } => drop(reply.send(Err(error()))),
        Write::Expire { reply, .. } => drop(reply.send(Err(error()))),
        Write::Ingest { reply, .. } => drop(reply.send(Err(error()))),
        Write::DropWatch { reply, .. } => drop(reply.send(Err(error()))),
        Write::Record { attempt, .. } => {
            lost_outcomes.lock().insert(attempt.subscription_id);
        }
    }
}

/// Runs `f` in a savepoint: a failing write is undone alone and the batch goes on. The
/// savepoint statements are cached, not parsed anew for every write.
fn in_savepoint<T>(
    tx: &Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    tx.prepare_cached("SAVEPOINT write")?.execute([])?;
    match f(tx) {
        Ok(value) => {
            tx.prepare_cached("RELEASE write")?.execute([])?;
            Ok(value)
        }
        Err(error) => {
            // After a full disk SQLite has rolled the whole transaction back: no savepoint
            // is left to roll back to, and the batch fails as a whole (`apply_batch`).
            if !tx.is_autocommit() {
                tx.prepare_cached("ROLLBACK TO write")?.execute([])?;
                tx.prepare_cached("RELEASE write")?.execute([])?;
            }
            Err(error)
        }
    }
}

/// Stores each event once and queues it for its subscriptions. Per publish call: one
/// INSERT per event, and the fan-out rows of all its events in chunks of many rows per
/// statement (`SetStatement`).
fn publish(
    conn: &Connection,
    events: &[NewEvent],
    backlog_cap: i64,
    now: Millis,
) -> Result<Vec<Vec<Fanout>>, StoreError> {
    let subscriptions: BTreeSet<i64> = events.iter().flat_map(|e| e.subscriptions.iter().copied()).collect();
    if subscriptions.is_empty() {
        return Ok(vec![Vec::new(); events.len()]);
    }
    let ids: Vec<&dyn ToSql> = subscriptions.iter().map(|id| id as &dyn ToSql).collect();
    ENSURE_SUBSCRIPTIONS.execute(conn, &ids)?;
    // Per subscription: next distribution id, next position, pending, dead letters added.
    let mut next: HashMap<i64, (i64, i64, i64, i64)> = HashMap::with_capacity(subscriptions.len());
    NEXT_POSITIONS.run(conn, &ids, |r| {
        next.insert(r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, 0));
        Ok(())
    })?;
    let mut queued_rows: Vec<[i64; 4]> = Vec::new();
    let mut overflowed: Vec<[i64; 3]> = Vec::new();
    let mut fanouts = Vec::with_capacity(events.len());
    for event in events {
        if event.subscriptions.is_empty() {
            fanouts.push(Vec::new());
            continue;
        }
        conn.prepare_cached("INSERT INTO events (body, refs, published_at) VALUES (?1, ?2, ?3)")?.execute(params![
            event.body,
            event.subscriptions.len(),
            now
        ])?;
        let event_id = conn.last_insert_rowid();
        let mut fanout = Vec::with_capacity(event.subscriptions.len());
        for &subscription_id in &event.subscriptions {
            let Some((distribution_id, position, pending, dead)) = next.get_mut(&subscription_id) else {
                return Err(StoreError::Commit(format!("subscription {subscription_id} has no counters row")));
            };
            let queued = *pending < backlog_cap;
            if queued {
                queued_rows.push([subscription_id, *position, event_id, *distribution_id]);
                *position += 1;
                *pending += 1;
            } else {
                overflowed.push([subscription_id, *distribution_id, event_id]);
                *dead += 1;
            }
            fanout.push(Fanout { subscription_id, distribution_id: *distribution_id, queued });
            *distribution_id += 1;
        }
        fanouts.push(fanout);
    }
    let values: Vec<&dyn ToSql> =
        queued_rows.iter().flat_map(|[s, p, e, d]| [s as &dyn ToSql, p, e, d, &now]).collect();
    ENQUEUE.execute(conn, &values)?;
    let error = format!("backlog of {backlog_cap} pending events is full");
    let values: Vec<&dyn ToSql> =
        overflowed.iter().flat_map(|[s, d, e]| [s as &dyn ToSql, d, e, &error, &now]).collect();
    OVERFLOW.execute(conn, &values)?;
    let values: Vec<&dyn ToSql> = next
        .iter()
        .flat_map(|(id, (distribution, position, pending, dead))| {
            [id as &dyn ToSql, distribution, position, pending, dead]
        })
        .collect();
    ADVANCE.execute(conn, &values)?;
    Ok(fanouts)
}

/// Commits one watch page: its events as `publish` does, the cursor after them, and its
/// pre-image changes, forgetting the least recently changed instances beyond the limit.
fn ingest(conn: &Connection, page: &WatchPage, backlog_cap: i64, now: Millis) -> Result<Vec<Vec<Fanout>>, StoreError> {
    let fanouts = publish(conn, &page.events, backlog_cap, now)?;
    conn.prepare_cached(
        "INSERT INTO watches (watch, cursor, events_read, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (watch) DO UPDATE SET cursor = excluded.cursor,
             events_read = watches.events_read + excluded.events_read, updated_at = excluded.updated_at",
    )?
    .execute(params![page.watch, page.cursor, page.read, now])?;
    if page.forget_pre_images {
        conn.prepare_cached("DELETE FROM pre_images WHERE watch = ?1")?.execute([&page.watch])?;
        conn.prepare_cached("UPDATE watches SET pre_images = 0 WHERE watch = ?1")?.execute([&page.watch])?;
    }
    if page.pre_images.is_empty() {
        return Ok(fanouts);
    }
    let (mut touch, mut kept): (i64, i64) = conn
        .prepare_cached("SELECT next_touch, pre_images FROM watches WHERE watch = ?1")?
        .query_row([&page.watch], |r| Ok((r.get(0)?, r.get(1)?)))?;
    for (instance, detail) in &page.pre_images {
        match detail {
            Some(detail) => {
                let updated = conn
                    .prepare_cached(
                        "UPDATE pre_images SET detail = ?3, touched = ?4 WHERE watch = ?1 AND instance = ?2",
                    )?
                    .execute(params![page.watch, instance, detail, touch])?;
                if updated == 0 {
                    conn.prepare_cached(
                        "INSERT INTO pre_images (watch, instance, detail, touched) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![page.watch, instance, detail, touch])?;
                    kept += 1;
                }
            }
            None => {
                let deleted = conn
                    .prepare_cached("DELETE FROM pre_images WHERE watch = ?1 AND instance = ?2")?
                    .execute(params![page.watch, instance])?;
                kept -= i64::try_from(deleted).unwrap_or(0);
            }
        }
        touch += 1;
    }
    let limit = page.pre_image_limit.max(0);
    if kept > limit {
        conn.prepare_cached(
            "DELETE FROM pre_images WHERE watch = ?1 AND instance IN
                 (SELECT instance FROM pre_images WHERE watch = ?1 ORDER BY touched LIMIT ?2)",
        )?
        .execute(params![page.watch, kept - limit])?;
        kept = limit;
    }
    conn.prepare_cached("UPDATE watches SET next_touch = ?2, pre_images = ?3 WHERE watch = ?1")?
        .execute(params![page.watch, touch, kept])?;
    Ok(fanouts)
}

fn drop_watch(conn: &Connection, watch: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM pre_images WHERE watch = ?1")?.execute([watch])?;
    conn.prepare_cached("DELETE FROM watches WHERE watch = ?1")?.execute([watch])?;
    Ok(())
}

/// Drops `references` (event id → how many) and deletes the events no one needs any more.
fn release_events(conn: &Connection, references: &BTreeMap<i64, i64>) -> Result<(), StoreError> {
    let pairs: Vec<&dyn ToSql> = references.iter().flat_map(|(id, n)| [id as &dyn ToSql, n]).collect();
    RELEASE.execute(conn, &pairs)?;
    let ids: Vec<&dyn ToSql> = references.keys().map(|id| id as &dyn ToSql).collect();
    DROP_RELEASED.execute(conn, &ids)
}

/// A queue row a run of outcomes is about, as the run found it.
struct OutcomeRow {
    event_id: i64,
    distribution_id: i64,
    attempts: i64,
    /// Failed attempts recorded for it in this run.
    failed: i64,
    /// Delivered or dead-lettered in this run: later outcomes for it find nothing.
    settled: bool,
}

/// What a run of outcomes adds to one subscription's counters.
#[derive(Default)]
struct CounterDelta {
    total: i64,
    failure: i64,
    delivered: i64,
    dead_lettered: i64,
    /// Entries that left the queue (`pending` falls by this).
    settled: i64,
    /// A delivery reset `consecutive_failures`; `consecutive` is then its new value,
    /// otherwise what it grows by.
    reset: bool,
    consecutive: i64,
    last_error: Option<String>,
    last_delivery_at: Option<Millis>,
    /// Attempts it logged.
    logged: i64,
}

/// Applies a run of outcomes, in the order they were recorded, as sets: a statement per
/// chunk of rows (`SetStatement`), not per outcome. The outcomes are folded in memory
/// over the queue rows they are about (an outcome for a row that is gone counts for
/// nothing, as does one for a row settled earlier in the run), then written: settled rows
/// deleted, retried rows' attempts raised, dead letters inserted, delivered events
/// released, the counters moved, and the attempts logged (the log and the per-minute
/// counts cut to their bounds for the subscriptions the run touched).
fn record(conn: &Connection, attempts: &[Attempt]) -> Result<(), StoreError> {
    let keys: BTreeSet<(i64, i64)> = attempts.iter().map(|a| (a.subscription_id, a.position)).collect();
    let mut rows: HashMap<(i64, i64), OutcomeRow> = HashMap::with_capacity(keys.len());
    let values: Vec<&dyn ToSql> = keys.iter().flat_map(|(s, p)| [s as &dyn ToSql, p]).collect();
    OUTCOME_ROWS.run(conn, &values, |r| {
        let row = OutcomeRow {
            event_id: r.get(2)?,
            distribution_id: r.get(3)?,
            attempts: r.get(4)?,
            failed: 0,
            settled: false,
        };
        rows.insert((r.get(0)?, r.get(1)?), row);
        Ok(())
    })?;
    let mut deltas: BTreeMap<i64, CounterDelta> = BTreeMap::new();
    let mut letters: Vec<(i64, i64, i64, i64, &str, &str, Millis)> = Vec::new();
    let mut released: BTreeMap<i64, i64> = BTreeMap::new();
    // (subscription, at, distribution id, attempt number, result, error, exchange)
    let mut logged: Vec<(i64, Millis, i64, i64, &'static str, &str, &Exchange)> = Vec::new();
    let mut minutes: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for attempt in attempts {
        let Some(row) = rows.get_mut(&(attempt.subscription_id, attempt.position)) else { continue };
        if row.settled {
            continue;
        }
        if let Some(result) = AttemptResult::of(&attempt.outcome) {
            let error = match &attempt.outcome {
                Outcome::Delivered => "",
                Outcome::Failed { error } | Outcome::DeadLettered { error, .. } => error,
            };
            let number = row.attempts + row.failed + 1;
            let id = attempt.subscription_id;
            logged.push((id, attempt.at, row.distribution_id, number, result.as_str(), error, &attempt.exchange));
            let counts = minutes.entry((id, minute_of(attempt.at))).or_default();
            counts.0 += 1;
            counts.1 += i64::from(result != AttemptResult::Delivered);
        }
        let delta = deltas.entry(attempt.subscription_id).or_default();
        match &attempt.outcome {
            Outcome::Delivered => {
                row.settled = true;
                *released.entry(row.event_id).or_default() += 1;
                delta.total += 1;
                delta.delivered += 1;
                delta.settled += 1;
                delta.reset = true;
                delta.consecutive = 0;
                delta.last_delivery_at = Some(attempt.at);
            }
            Outcome::Failed { error } => {
                row.failed += 1;
                delta.total += 1;
                delta.failure += 1;
                delta.consecutive += 1;
                delta.last_error = Some(error.clone());
            }
            Outcome::DeadLettered { error, reason, attempted } => {
                row.settled = true;
                let attempted = i64::from(*attempted);
                delta.total += attempted;
                delta.failure += attempted;
                delta.consecutive += attempted;
                delta.last_error = Some(error.clone());
                delta.dead_lettered += 1;
                delta.settled += 1;
                let attempts = row.attempts + row.failed + attempted;
                letters.push((
                    attempt.subscription_id,
                    row.distribution_id,
                    row.event_id,
                    attempts,
                    reason,
                    error,
                    attempt.at,
                ));
            }
        }
    }
    let settled: Vec<&dyn ToSql> =
        rows.iter().filter(|(_, row)| row.settled).flat_map(|((s, p), _)| [s as &dyn ToSql, p]).collect();
    SETTLE.execute(conn, &settled)?;
    let retried: Vec<&dyn ToSql> = rows
        .iter()
        .filter(|(_, row)| !row.settled && row.failed > 0)
        .flat_map(|((s, p), row)| [s as &dyn ToSql, p, &row.failed])
        .collect();
    RETRIED.execute(conn, &retried)?;
    let values: Vec<&dyn ToSql> = letters
        .iter()
        .flat_map(|(s, d, e, a, reason, error, at)| [s as &dyn ToSql, d, e, a, reason, error, at])
        .collect();
    DEAD_LETTERS.execute(conn, &values)?;
    if !released.is_empty() {
        release_events(conn, &released)?;
    }
    log_attempts(conn, &logged, &minutes, &mut deltas)?;
    let values: Vec<&dyn ToSql> = deltas
        .iter()
        .flat_map(|(id, d)| {
            [
                id as &dyn ToSql,
                &d.total,
                &d.failure,
                &d.delivered,
                &d.dead_lettered,
                &d.settled,
                &d.reset,
                &d.consecutive,
                &d.last_error,
                &d.last_delivery_at,
                &d.logged,
            ]
        })
        .collect();
    COUNTERS.execute(conn, &values)
}

/// Appends a run's attempts to the log with the sequence numbers that follow each
/// subscription's last, drops what falls out of `LOGGED_ATTEMPTS`, and adds the per-minute
/// counts, dropping minutes more than `MINUTES_KEPT` older than each subscription's newest. `deltas` learn how many each logged.
#[allow(clippy::type_complexity)] // one row of the LOG statement
fn log_attempts(
    conn: &Connection,
    logged: &[(i64, Millis, i64, i64, &'static str, &str, &Exchange)],
    minutes: &BTreeMap<(i64, i64), (i64, i64)>,
    deltas: &mut BTreeMap<i64, CounterDelta>,
) -> Result<(), StoreError> {
    if logged.is_empty() {
        return Ok(());
    }
    let ids: BTreeSet<i64> = logged.iter().map(|row| row.0).collect();
    let mut last: HashMap<i64, i64> = HashMap::with_capacity(ids.len());
    let values: Vec<&dyn ToSql> = ids.iter().map(|id| id as &dyn ToSql).collect();
    LOGGED.run(conn, &values, |r| {
        last.insert(r.get(0)?, r.get(1)?);
        Ok(())
    })?;
    let mut rows: Vec<(i64, i64, Millis, i64, i64, &str, &str, Option<u16>, Option<u32>, &str)> =
        Vec::with_capacity(logged.len());
    for &(id, at, distribution_id, number, result, error, exchange) in logged {
        let seq = last.entry(id).or_default();
        *seq += 1;
        deltas.entry(id).or_default().logged += 1;
        let (status, latency, head) = (exchange.http_status, exchange.latency_ms, exchange.answer_head.as_str());
        rows.push((id, *seq, at, distribution_id, number, result, error, status, latency, head));
    }
    let values: Vec<&dyn ToSql> = rows
        .iter()
        .flat_map(|(id, seq, at, d, n, result, error, status, latency, head)| {
            [id as &dyn ToSql, seq, at, d, n, result, error, status, latency, head]
        })
        .collect();
    LOG.execute(conn, &values)?;
    let keep = i64::try_from(LOGGED_ATTEMPTS).unwrap_or(i64::MAX);
    let cuts: Vec<(i64, i64)> = last.iter().map(|(&id, &seq)| (id, seq - keep)).filter(|&(_, cut)| cut > 0).collect();
    let values: Vec<&dyn ToSql> = cuts.iter().flat_map(|(id, cut)| [id as &dyn ToSql, cut]).collect();
    LOG_TRIM.execute(conn, &values)?;
    let values: Vec<&dyn ToSql> =
        minutes.iter().flat_map(|((id, minute), (a, f))| [id as &dyn ToSql, minute, a, f]).collect();
    MINUTES.execute(conn, &values)?;
    let touched: BTreeSet<i64> = minutes.keys().map(|&(id, _)| id).collect();
    let values: Vec<&dyn ToSql> = touched.iter().flat_map(|id| [id as &dyn ToSql, &MINUTES_KEPT]).collect();
    MINUTES_TRIM.execute(conn, &values)
}

fn replay(
    conn: &Connection,
    subscription_id: i64,
    distribution_ids: Option<&[i64]>,
    now: Millis,
) -> Result<usize, StoreError> {
    let letters: Vec<(i64, i64)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT distribution_id, event_id FROM dead_letters WHERE subscription_id = ?1 ORDER BY distribution_id",
        )?;
        let rows = stmt.query_map([subscription_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    // A set: a replay of thousands of chosen ids must not be a scan per dead letter.
    let wanted: Option<HashSet<i64>> = distribution_ids.map(|ids| ids.iter().copied().collect());
    let mut moved = 0;
    for (distribution_id, event_id) in letters {
        if wanted.as_ref().is_some_and(|wanted| !wanted.contains(&distribution_id)) {
            continue;
        }
        let position: i64 = conn
            .prepare_cached("SELECT next_position FROM subscriptions WHERE subscription_id = ?1")?
            .query_row([subscription_id], |r| r.get(0))?;
        conn.prepare_cached("DELETE FROM dead_letters WHERE subscription_id = ?1 AND distribution_id = ?2")?
            .execute([subscription_id, distribution_id])?;
        conn.prepare_cached(
            "INSERT INTO queue (subscription_id, position, event_id, distribution_id, attempts, enqueued_at) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        )?
        .execute(params![subscription_id, position, event_id, distribution_id, now])?;
        conn.prepare_cached("UPDATE subscriptions SET next_position = next_position + 1, pending = pending + 1 WHERE subscription_id = ?1")?
            .execute([subscription_id])?;
        moved += 1;
    }
    Ok(moved)
}

/// How many references each event in `event_ids` loses.
fn reference_counts(event_ids: impl IntoIterator<Item = i64>) -> BTreeMap<i64, i64> {
    let mut counts = BTreeMap::new();
    for event_id in event_ids {
        *counts.entry(event_id).or_default() += 1;
    }
    counts
}

fn drop_subscription(conn: &Connection, subscription_id: i64) -> Result<(), StoreError> {
    let events: Vec<i64> = {
        let mut stmt = conn.prepare_cached(
            "SELECT event_id FROM queue WHERE subscription_id = ?1 UNION ALL SELECT event_id FROM dead_letters WHERE subscription_id = ?1",
        )?;
        let rows = stmt.query_map([subscription_id], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    release_events(conn, &reference_counts(events))?;
    for table in ["queue", "dead_letters", "attempt_log", "attempt_minutes", "subscriptions"] {
        conn.execute(&format!("DELETE FROM {table} WHERE subscription_id = ?1"), [subscription_id])?;
    }
    Ok(())
}

fn expire(conn: &Connection, before: Millis) -> Result<usize, StoreError> {
    let expired: Vec<i64> = {
        let mut stmt = conn.prepare_cached("DELETE FROM dead_letters WHERE dead_at < ?1 RETURNING event_id")?;
        let rows = stmt.query_map([before], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    release_events(conn, &reference_counts(expired.iter().copied()))?;
    Ok(expired.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ANSWER_HEAD_BYTES;
    use crate::store::conformance::limits;
    use std::path::PathBuf;

    /// A store in a directory of its own, for the conformance suite.
    fn open_fresh(limits: Limits) -> Arc<dyn EventStore> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = temp_dir(&format!("conformance-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        Arc::new(SqliteStore::open(&dir, limits).unwrap())
    }

    crate::store::conformance::conformance_suite!(open_fresh);

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herald-store-{name}-{}-{}", std::process::id(), now_millis()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn event(body: &str, subscriptions: &[i64]) -> NewEvent {
        NewEvent { body: body.into(), subscriptions: subscriptions.to_vec() }
    }

    async fn attempt(store: &SqliteStore, subscription_id: i64, position: i64, outcome: Outcome) {
        let attempt = Attempt { subscription_id, position, outcome, at: 1, exchange: Exchange::default() };
        let ticket = store.record_attempt(attempt).unwrap();
        store.committed(ticket).await.unwrap();
    }

    #[tokio::test]
    async fn commits_are_durable_wal_with_full_sync() {
        let dir = temp_dir("durability");
        let store = SqliteStore::open(&dir, limits()).unwrap();
        assert_eq!(store.durability(), ("wal", 2));
    }

    #[tokio::test]
    async fn queue_reads_reuse_their_prepared_statement() {
        let dir = temp_dir("reprepare");
        let store = SqliteStore::open(&dir, limits()).unwrap();
        store.publish(vec![event("a", &[1]), event("b", &[1])]).await.unwrap();
        for after in [0, 1, 0] {
            store.queued(1, after, 10).await.unwrap();
        }
        let conn = store.reader.lock().unwrap();
        let stmt = conn.prepare_cached(QUEUED_SQL).unwrap();
        assert_eq!(
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "binding LIMIT must not expire the cached statement"
        );
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = temp_dir("lock");
        let _first = SqliteStore::open(&dir, limits()).unwrap();
        assert!(matches!(SqliteStore::open(&dir, limits()), Err(StoreError::Locked { .. })));
    }

    #[tokio::test]
    async fn a_full_disk_refuses_the_publish_whole_and_keeps_what_was_accepted() {
        let dir = temp_dir("full");
        // The schema takes a few pages; leave room for a few small events only.
        let store = SqliteStore::open_with_page_limit(&dir, limits(), Some(40)).unwrap();
        let small: Vec<NewEvent> = (0..5).map(|n| event(&format!("{{\"n\":{n}}}"), &[1])).collect();
        store.publish(small).await.unwrap();
        let big = "x".repeat(1 << 20);
        let refused = store.publish(vec![event(&big, &[1]), event("{}", &[1])]).await;
        assert!(matches!(refused, Err(StoreError::Full { .. })), "{refused:?}");
        let kept = store.queued(1, 0, 100).await.unwrap();
        assert_eq!(kept.len(), 5, "what was accepted stays, nothing of the refused request does");
        assert_eq!(store.counters(1).await.unwrap().pending, 5);
        assert!(store.publish(vec![event("{}", &[1])]).await.is_ok(), "a request that fits is still taken");
    }

    #[tokio::test]
    async fn dropping_a_subscription_deletes_events_no_one_else_needs() {
        let dir = temp_dir("drop");
        let store = SqliteStore::open(&dir, limits()).unwrap();
        store.publish(vec![event("shared", &[1, 2]), event("own", &[1])]).await.unwrap();
        store.drop_subscription(1).await.unwrap();
        assert_eq!(store.subscriptions().await.unwrap(), vec![2]);
        assert_eq!(store.queued(2, 0, 10).await.unwrap()[0].body, "shared");
        let events: i64 = store.read(|c| c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))).await.unwrap();
        assert_eq!(events, 1);
    }

    #[tokio::test]
    async fn reopening_keeps_everything_committed() {
        let dir = temp_dir("reopen");
        {
            let store = SqliteStore::open(&dir, limits()).unwrap();
            store.publish(vec![event("a", &[3])]).await.unwrap();
            attempt(&store, 3, 1, Outcome::Failed { error: "timeout".into() }).await;
        }
        // The writer thread of the first store may still hold its connection briefly.
        let store = loop {
            match SqliteStore::open(&dir, limits()) {
                Ok(store) => break store,
                Err(StoreError::Locked { .. }) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Err(other) => panic!("{other}"),
            }
        };
        let queued = store.queued(3, 0, 10).await.unwrap();
        assert_eq!((queued[0].attempts, queued[0].body.as_str()), (1, "a"));
    }

    /// What a store holds for `subscriptions`, without event ids (each store numbers its
    /// own): counters, the queue, the dead letters.
    async fn contents(store: &dyn EventStore, subscriptions: &[i64]) -> Vec<String> {
        let mut shown = Vec::new();
        for &id in subscriptions {
            shown.push(format!("{id}: {:?}", store.counters(id).await.unwrap()));
            for q in store.queued(id, 0, 10_000).await.unwrap() {
                shown.push(format!("{id} queued {} {} {} {}", q.position, q.distribution_id, q.attempts, q.body));
            }
            for d in store.dead_letters(id, 10_000).await.unwrap() {
                // A backlog overflow is dead at publish time, which each store reads itself.
                let dead_at = (d.reason != "BacklogFull").then_some(d.dead_at);
                let letter = (d.distribution_id, d.attempts, &d.reason, &d.error, dead_at, &d.body);
                shown.push(format!("{id} dead {letter:?}"));
            }
            for logged in store.delivery_log(id, LOGGED_ATTEMPTS).await.unwrap() {
                shown.push(format!("{id} logged {logged:?}"));
            }
            for minute in store.attempts_per_minute(id, i64::MIN..=i64::MAX).await.unwrap() {
                shown.push(format!("{id} minute {minute:?}"));
            }
        }
        shown
    }

    /// The set-based writer against the in-memory store's one-at-a-time semantics:
    /// random publishes (past the backlog cap), outcomes for rows that exist, are already
    /// settled or never existed, replays and dead-letter expiry, recorded in bursts so the
    /// writer folds them into runs, over more time than the per-minute counts keep; both
    /// stores must end up holding the same.
    #[tokio::test]
    async fn runs_of_outcomes_leave_what_one_at_a_time_would() {
        let subscriptions = [1, 2, 3, 4];
        let limits = || Limits { quota_bytes: u64::MAX, backlog_cap: 6 };
        for seed in 0..40 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let dir = temp_dir(&format!("runs-{seed}"));
            let sqlite = SqliteStore::open(&dir, limits()).unwrap();
            let memory = crate::store::memory::MemoryStore::new(limits());
            let mut published = 0;
            let mut clock: Millis = 0;
            for step in 0..30 {
                let chosen: Vec<i64> = subscriptions.iter().copied().filter(|_| rng.bool()).collect();
                let events: Vec<NewEvent> =
                    (0..rng.usize(1..4)).map(|i| event(&format!("e{step}-{i}"), &chosen)).collect();
                published += 1;
                let stored = sqlite.publish(events.clone()).await.unwrap();
                assert_eq!(stored, memory.publish(events).await.unwrap(), "seed {seed} step {step}: fan-out");
                let mut last_ticket = 0;
                for _ in 0..rng.usize(0..12) {
                    let outcome = match rng.u8(0..4) {
                        0 | 1 => Outcome::Delivered,
                        2 => Outcome::Failed { error: format!("error {}", rng.u8(..)) },
                        _ => {
                            Outcome::DeadLettered { error: "gone".into(), reason: "Gone".into(), attempted: rng.bool() }
                        }
                    };
                    clock += rng.i64(0..=60) * 60_000;
                    let exchange = match rng.u8(0..3) {
                        0 => Exchange::default(),
                        1 => Exchange::unanswered(rng.u32(..)),
                        _ => Exchange::answered(
                            rng.u16(100..600),
                            rng.u32(..),
                            format!("body {}", rng.u8(..)).as_bytes(),
                        ),
                    };
                    let attempt = Attempt {
                        subscription_id: rng.i64(1..=5),
                        position: rng.i64(1..=published * 3),
                        outcome,
                        at: clock,
                        exchange,
                    };
                    memory.record_attempt(attempt.clone()).unwrap();
                    last_ticket = sqlite.record_attempt(attempt).unwrap();
                }
                sqlite.committed(last_ticket).await.unwrap();
                if rng.u8(0..10) == 0 {
                    let id = rng.i64(1..=4);
                    assert_eq!(sqlite.replay(id, None).await.unwrap(), memory.replay(id, None).await.unwrap());
                }
                if rng.u8(0..10) == 0 {
                    let before = rng.i64(0..=clock);
                    let expired = sqlite.expire_dead_letters(before).await.unwrap();
                    assert_eq!(expired, memory.expire_dead_letters(before).await.unwrap(), "seed {seed}: expiry");
                }
            }
            assert_eq!(contents(&sqlite, &subscriptions).await, contents(&memory, &subscriptions).await, "seed {seed}");
            assert_eq!(sqlite.pending_total().await.unwrap(), memory.pending_total().await.unwrap(), "seed {seed}");
        }
    }

    /// Sets larger than the biggest chunk: 600 fan-out rows and a burst of 600 outcomes
    /// cross every chunk size, and leave what the in-memory store leaves.
    #[tokio::test]
    async fn sets_larger_than_a_chunk_leave_what_one_at_a_time_would() {
        let subscriptions: Vec<i64> = (1..=300).collect();
        let dir = temp_dir("chunks");
        let sqlite = SqliteStore::open(&dir, limits()).unwrap();
        let memory = crate::store::memory::MemoryStore::new(limits());
        let events = vec![event("a", &subscriptions), event("b", &subscriptions)];
        assert_eq!(sqlite.publish(events.clone()).await.unwrap(), memory.publish(events).await.unwrap());
        let mut last_ticket = 0;
        for (i, &subscription_id) in subscriptions.iter().enumerate() {
            for position in 1..=2 {
                let outcome = match (i + position as usize) % 3 {
                    0 => Outcome::Delivered,
                    1 => Outcome::Failed { error: format!("{i}") },
                    _ => Outcome::DeadLettered { error: "x".into(), reason: "Gone".into(), attempted: true },
                };
                let attempt = Attempt { subscription_id, position, outcome, at: 5, exchange: Exchange::default() };
                memory.record_attempt(attempt.clone()).unwrap();
                last_ticket = sqlite.record_attempt(attempt).unwrap();
            }
        }
        sqlite.committed(last_ticket).await.unwrap();
        assert_eq!(contents(&sqlite, &subscriptions).await, contents(&memory, &subscriptions).await);
    }

    /// A store the first schema wrote (before the delivery log) opens with the current one:
    /// its queue and counters kept, its attempts logged from then on.
    #[tokio::test]
    async fn a_store_of_the_first_schema_upgrades_in_place() {
        let dir = temp_dir("upgrade");
        std::fs::create_dir_all(&dir).unwrap();
        {
            let conn = Connection::open(dir.join(DATABASE_FILE)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO events (id, body, refs, published_at) VALUES (1, 'e', 1, 1);
                 INSERT INTO subscriptions (subscription_id, next_distribution_id, next_position, pending, total)
                     VALUES (7, 2, 2, 1, 3);
                 INSERT INTO queue (subscription_id, position, event_id, distribution_id, attempts, enqueued_at)
                     VALUES (7, 1, 1, 1, 2, 1);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&dir, limits()).unwrap();
        let version: i64 = store.reader.lock().unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        assert_eq!(store.queued(7, 0, 10).await.unwrap().len(), 1, "the queue is kept");
        assert_eq!((store.counters(7).await.unwrap().total, store.counters(7).await.unwrap().pending), (3, 1));
        attempt(&store, 7, 1, Outcome::Delivered).await;
        let log = store.delivery_log(7, 10).await.unwrap();
        assert_eq!(log.iter().map(|a| (a.distribution_id, a.attempt)).collect::<Vec<_>>(), [(1, 3)]);
    }

    /// The log keeps the newest `LOGGED_ATTEMPTS` attempts and the per-minute counts the
    /// last `MINUTES_KEPT` minutes, however many runs they arrive in; an expired entry is
    /// not an attempt and logs nothing.
    #[tokio::test]
    async fn the_delivery_log_and_the_minute_counts_stay_within_their_bounds() {
        let dir = temp_dir("log-bounds");
        let store = SqliteStore::open(&dir, limits()).unwrap();
        store.publish(vec![event("a", &[1]), event("b", &[1])]).await.unwrap();
        let minute = 60_000;
        let total = i64::try_from(LOGGED_ATTEMPTS).unwrap() + 50;
        for n in 1..=total {
            // One failed attempt every 20 minutes, a few per run.
            let exchange = Exchange::answered(500, u32::try_from(n).unwrap(), format!("no {n}").as_bytes());
            let outcome = Outcome::Failed { error: format!("HTTP 500 ({n})") };
            let ticket = store.record_attempt(Attempt {
                subscription_id: 1,
                position: 1,
                outcome,
                at: n * 20 * minute,
                exchange,
            });
            if n % 7 == 0 {
                store.committed(ticket.unwrap()).await.unwrap();
            }
        }
        let outcome = Outcome::DeadLettered { error: "late".into(), reason: "Expired".into(), attempted: false };
        let ticket = store.record_attempt(Attempt {
            subscription_id: 1,
            position: 2,
            outcome,
            at: total * 20 * minute,
            exchange: Exchange::default(),
        });
        store.committed(ticket.unwrap()).await.unwrap();

        let log = store.delivery_log(1, 1000).await.unwrap();
        assert_eq!(log.len(), LOGGED_ATTEMPTS, "only the newest are kept");
        let numbers: Vec<i64> = log.iter().map(|a| a.attempt).collect();
        assert_eq!(numbers, (51..=total).rev().collect::<Vec<_>>(), "newest first, numbered per delivery");
        let newest = &log[0];
        assert_eq!(
            (newest.result, newest.distribution_id, newest.error.as_str()),
            (AttemptResult::Failed, 1, "HTTP 500 (150)")
        );
        assert_eq!(newest.exchange, Exchange::answered(500, 150, b"no 150"));

        let counts = store.attempts_per_minute(1, i64::MIN..=i64::MAX).await.unwrap();
        let newest_minute = total * 20;
        assert_eq!(counts.len(), usize::try_from(MINUTES_KEPT / 20).unwrap(), "a day of 20-minute steps: {counts:?}");
        assert!(counts.iter().all(|c| c.minute > newest_minute - MINUTES_KEPT && (c.attempts, c.failures) == (1, 1)));
        assert_eq!(store.attempts_per_minute(1, newest_minute..=i64::MAX).await.unwrap().len(), 1, "from a minute on");

        store.drop_subscription(1).await.unwrap();
        assert!(store.delivery_log(1, 1000).await.unwrap().is_empty());
        assert!(store.attempts_per_minute(1, i64::MIN..=i64::MAX).await.unwrap().is_empty());
    }

    #[test]
    fn answer_heads_keep_whole_characters() {
        // "a" and then two-byte characters: the limit falls inside one.
        let body = format!("a{}", "é".repeat(ANSWER_HEAD_BYTES));
        let head = Exchange::answered(200, 1, body.as_bytes()).answer_head;
        assert_eq!(head, format!("a{}", "é".repeat(ANSWER_HEAD_BYTES / 2 - 1)), "whole characters up to the limit");
        // Not UTF-8 at all: replacement characters, still within the limit.
        let binary = Exchange::answered(200, 1, &[0xff; 300]).answer_head;
        assert!(binary.len() <= ANSWER_HEAD_BYTES && binary.chars().all(|c| c == '\u{FFFD}'), "{}", binary.len());
        // A real U+FFFD at the end is kept.
        assert_eq!(Exchange::answered(200, 1, "ok\u{FFFD}".as_bytes()).answer_head, "ok\u{FFFD}");
        assert_eq!(Exchange::answered(200, 1, b"short").answer_head, "short");
    }

    #[test]
    fn set_statements_look_rows_up_by_key() {
        let dir = temp_dir("plans");
        let store = SqliteStore::open(&dir, limits()).unwrap();
        let conn = store.reader.lock().unwrap();
        for statement in [
            &ENSURE_SUBSCRIPTIONS,
            &NEXT_POSITIONS,
            &ENQUEUE,
            &OVERFLOW,
            &ADVANCE,
            &OUTCOME_ROWS,
            &SETTLE,
            &RETRIED,
            &DEAD_LETTERS,
            &COUNTERS,
            &RELEASE,
            &DROP_RELEASED,
            &LOGGED,
            &LOG,
            &LOG_TRIM,
            &MINUTES,
            &MINUTES_TRIM,
        ] {
            for (size_index, size) in CHUNK_SIZES.iter().enumerate() {
                let sql = statement.sql(size_index);
                let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                for i in 1..=stmt.parameter_count() {
                    stmt.raw_bind_parameter(i, 0).unwrap();
                }
                let mut plan = Vec::new();
                let mut rows = stmt.raw_query();
                while let Some(row) = rows.next().unwrap() {
                    plan.push(row.get::<_, String>(3).unwrap());
                }
                for table in [
                    "queue",
                    "q",
                    "subscriptions",
                    "events",
                    "dead_letters",
                    "attempt_log",
                    "attempt_minutes",
                    "l",
                    "m",
                    "n",
                ] {
                    let scan = format!("SCAN {table}");
                    let scans = |step: &String| *step == scan || step.starts_with(&format!("{scan} "));
                    assert!(!plan.iter().any(scans), "{size} rows: {}\n{plan:?}", statement.sql);
                }
            }
        }
    }
}
