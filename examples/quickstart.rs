//! The first run: append records, read them back, reopen the queue, and show
//! that everything acknowledged survived. Uses a temporary directory unless
//! one is given: `cargo run --example quickstart [-- DIR]`.

use std::time::Instant;

use walq::{Durability, Queue, Record};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = std::env::args_os().nth(1).map_or_else(|| tmp.path().to_path_buf(), Into::into);
    println!("queue directory: {}", dir.display());

    let queue = Queue::open(&dir)?;
    let report = queue.recovery_report();
    println!("opened in {:?}: offsets {}..{}", report.duration, report.first_offset, report.next_offset);

    // Durable appends (the default): each returns after fdatasync.
    let started = Instant::now();
    let first = queue.append(b"hello")?;
    for i in 0..99u32 {
        queue.append_record(
            &Record::new(format!("order {i}").as_bytes()).key(b"shop-1").header(b"source", b"web"),
        )?;
    }
    let durable = started.elapsed();
    println!("100 durable appends in {durable:?} ({:?} each)", durable / 100);

    // Cheap appends, then one flush makes them durable together.
    let started = Instant::now();
    for i in 0..10_000u32 {
        queue.append_with(&i.to_le_bytes(), Durability::Os)?;
    }
    queue.flush()?;
    println!("10000 Os appends + one flush in {:?}", started.elapsed());

    let mut reader = queue.read_from(first)?;
    let mut count = 0u64;
    while let Some(record) = reader.next()? {
        if count < 3 {
            println!(
                "  offset {} key {:?} value {:?}",
                record.offset(),
                record.key().map(String::from_utf8_lossy),
                String::from_utf8_lossy(record.value())
            );
        }
        count += 1;
    }
    println!("read back {count} records");
    let next = queue.next_offset();
    queue.close()?;

    let queue = Queue::open(&dir)?;
    let report = queue.recovery_report();
    println!(
        "reopened in {:?}: next offset {} (was {next}), {} bytes cut",
        report.duration, report.next_offset, report.bytes_cut
    );
    assert_eq!(queue.next_offset(), next, "every acknowledged record survived");
    Ok(())
}
