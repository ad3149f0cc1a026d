//! `vmshift info`: what `qemu-img info` shows, with its JSON field names.

use anyhow::Result;
use serde_json::{json, Map, Value};
use vmshift_image::{allocated_bytes, ImageReader};
use vmshift_model::format_size;

use crate::args::{InfoArgs, Output};

pub fn run(args: &InfoArgs) -> Result<i32> {
    let top = super::open(
        &args.file,
        args.format,
        &args.gate,
        false,
        super::Use::Describe,
    )?;
    crate::sandbox::confine(&crate::sandbox::Policy::read())?;
    let layers = if args.backing_chain {
        super::chain(top.as_ref())
    } else {
        vec![top.as_ref()]
    };
    // The top image is named as the user wrote it; lower ones as the
    // image above names them, resolved beside it.
    let mut names = vec![args.file.display().to_string()];
    for l in &layers[..layers.len() - 1] {
        names.push(l.info().full_backing_filename.unwrap_or_default());
    }
    let objects: Vec<Value> = layers
        .iter()
        .zip(&names)
        .map(|(r, name)| to_json(*r, name))
        .collect();
    // The partition table is the guest's view: the top image's alone,
    // which needs its whole chain.
    let refused = layers.iter().any(|l| l.info().backing_refused.is_some());
    let table = if refused {
        Err(anyhow::anyhow!(
            "not read: the backing file was not opened, and part of the guest's data is in it"
        ))
    } else {
        vmshift_image::part::read_table(top.as_ref()).map_err(anyhow::Error::from)
    };
    match args.output {
        Output::Json => {
            let mut objects = objects;
            if let Some(Value::Object(m)) = objects.first_mut() {
                // The limits the whole guest view was read within: the
                // chain's depth and the partition table's counts.
                let mut used: Vec<(&'static str, u64)> = layers[0].info().limits;
                used.push(("chain-depth", super::chain(top.as_ref()).len() as u64));
                if let Ok(Some(t)) = &table {
                    match t.kind {
                        vmshift_image::part::TableKind::Gpt => used.push((
                            "gpt-entries",
                            t.gpt.as_ref().map_or(0, |g| u64::from(g.entries)),
                        )),
                        _ => used.push((
                            "mbr-logical-partitions",
                            t.partitions.iter().filter(|p| p.number > 4).count() as u64,
                        )),
                    }
                }
                m.insert("limits".into(), limits_json(&used));
                match &table {
                    Ok(Some(t)) => {
                        m.insert("partitions".into(), serde_json::to_value(t)?);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        m.insert("partitions-error".into(), json!(e.to_string()));
                    }
                }
            }
            let v = if args.backing_chain {
                Value::Array(objects)
            } else {
                objects.into_iter().next().unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            let texts: Vec<String> = layers
                .iter()
                .zip(&names)
                .map(|(r, n)| human(*r, n))
                .collect();
            print!("{}", texts.join("\n"));
            match &table {
                Ok(Some(t)) => print!("{}", super::part::human(t)),
                Ok(None) => {}
                Err(e) if refused => println!("Partition table: {e}"),
                Err(e) => println!("Partition table: unreadable: {e}"),
            }
        }
    }
    Ok(0)
}

/// The limits an image was checked against (`vmshift_model::limits`), each
/// with the image's own figure.
fn limits_json(used: &[(&'static str, u64)]) -> Value {
    Value::Array(
        used.iter()
            .filter_map(|(name, value)| {
                let l = vmshift_model::limits::named(name)?;
                Some(json!({"name": l.name, "limit": l.value, "value": value, "unit": l.unit}))
            })
            .collect(),
    )
}

fn to_json(r: &dyn ImageReader, name: &str) -> Value {
    let info = r.info();
    let mut m = Map::new();
    if !info.snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            serde_json::to_value(&info.snapshots).unwrap_or(Value::Null),
        );
    }
    if let Some(f) = &info.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    m.insert("virtual-size".into(), json!(r.size()));
    m.insert("filename".into(), json!(name));
    if let Some(cs) = info.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(r.format().name()));
    if let Some(a) = actual_size(r, &info) {
        m.insert("actual-size".into(), json!(a));
    }
    if !info.limits.is_empty() {
        m.insert("limits".into(), limits_json(&info.limits));
    }
    if !info.format_specific.is_empty() {
        let data: Map<String, Value> = info
            .format_specific
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        m.insert(
            "format-specific".into(),
            json!({"type": r.format().name(), "data": data}),
        );
    }
    if let Some(full) = &info.full_backing_filename {
        m.insert("full-backing-filename".into(), json!(full));
    }
    if let Some(b) = &info.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(p) = &info.backing_format_probed {
        m.insert("backing-format-probed".into(), json!(p));
    }
    if let Some(why) = &info.backing_refused {
        m.insert("backing-not-opened".into(), json!(why));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Value::Object(m)
}

/// Disk usage of the image file and of every other file it consists of
/// (each file once).
fn actual_size(r: &dyn ImageReader, info: &vmshift_image::ImageInfo) -> Option<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for p in std::iter::once(r.path()).chain(info.extra_files.iter().map(|p| p.as_path())) {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if seen.insert(key) {
            total += allocated_bytes(p)?;
        }
    }
    Some(total)
}

fn human(r: &dyn ImageReader, name: &str) -> String {
    let info = r.info();
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!("image: {name}"));
    line(format!("file format: {}", r.format()));
    line(format!(
        "virtual size: {} ({} bytes)",
        format_size(r.size()),
        r.size()
    ));
    if let Some(a) = actual_size(r, &info) {
        line(format!("disk size: {}", format_size(a)));
    }
    if let Some(cs) = info.cluster_size {
        line(format!("cluster_size: {cs}"));
    }
    if let Some(b) = &info.backing_filename {
        match &info.full_backing_filename {
            Some(full) if full != b => line(format!("backing file: {b} (actual path: {full})")),
            _ => line(format!("backing file: {b}")),
        }
    }
    if let Some(f) = &info.backing_format {
        line(format!("backing file format: {f}"));
    }
    if let Some(p) = &info.backing_format_probed {
        line(format!(
            "backing file format: {p} (probed: the image does not record it; check it is right)"
        ));
    }
    if let Some(why) = &info.backing_refused {
        line(format!("backing file not opened: {why}"));
    }
    if info.dirty {
        line("dirty flag: set (the image was not closed cleanly)".to_string());
    }
    if !info.snapshots.is_empty() {
        line("Snapshot list:".to_string());
        line(format!(
            "{:<7} {:<17} {:>7} {:>20} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        ));
        for sn in &info.snapshots {
            let clock = sn.vm_clock_sec;
            line(format!(
                "{:<7} {:<17} {:>7} {:>20} {:>15} {:>10}",
                sn.id,
                sn.name,
                format_size(sn.vm_state_size),
                date(sn.date_sec),
                format!(
                    "{:04}:{:02}:{:02}.{:03}",
                    clock / 3600,
                    clock / 60 % 60,
                    clock % 60,
                    sn.vm_clock_nsec / 1_000_000
                ),
                sn.icount.map_or(String::new(), |i| i.to_string())
            ));
        }
    }
    if !info.format_specific.is_empty() {
        line("Format specific information:".to_string());
        for (k, v) in &info.format_specific {
            nested(&mut line, 1, &k.replace('-', " "), v);
        }
    }
    s
}

/// Prints `key: value` at `depth`, objects and arrays nested below their
/// key the way qemu-img prints them (`[0]:` for array elements).
fn nested(line: &mut impl FnMut(String), depth: usize, key: &str, v: &Value) {
    let pad = "    ".repeat(depth);
    match v {
        Value::Object(m) => {
            line(format!("{pad}{key}:"));
            for (k, v) in m {
                nested(line, depth + 1, &k.replace('-', " "), v);
            }
        }
        Value::Array(a) => {
            line(format!("{pad}{key}:"));
            for (i, v) in a.iter().enumerate() {
                nested(line, depth + 1, &format!("[{i}]"), v);
            }
        }
        Value::String(s) => line(format!("{pad}{key}: {s}")),
        other => line(format!("{pad}{key}: {other}")),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_formats_epoch_seconds_in_utc() {
        assert_eq!(super::date(0), "1970-01-01 00:00:00");
        assert_eq!(super::date(1_795_875_260), "2026-11-28 14:14:20");
    }
}
