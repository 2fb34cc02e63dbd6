//! The command-line client against a real server: submit and follow a job, a URL list,
//! list, show, retry, cancel and link jobs; the piped view by capture, the terminal view
//! in a pseudo-terminal (`script`).

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

use std::process::Output;

use origin::{Origin, content};
use process::start;
use serde_json::Value;
use sha2::Digest as _;

/// Run `fileflow <args>` against `server`, its output captured (so piped).
async fn cli(server: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .args(args)
        .env("FILEFLOW_SERVER", server)
        .output()
        .await
        .expect("the client runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)))
}

#[tokio::test]
async fn submit_wait_follows_a_job_and_says_how_it_ended() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("FILEFLOW_MAX_RETRIES", "0")]).await;
    let size = 6 * 1024 * 1024u64;
    // About 2 s: 64 KiB every 20 ms.
    let url = origin.url(&format!("/slow/{size}?every_ms=20&seed=3"));
    let out =
        cli(&server.base, &["submit", &url, "--bucket", "cli", "--key", "slow.bin", "--wait", "--output", "json"])
            .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = json_of(&out);
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["sha256"], hex::encode(sha2::Sha256::digest(content(3, size))), "{job}");
    // Piped, progress comes as plain lines on standard error: the status, then the bytes.
    let progress = text(&out.stderr);
    let id = job["id"].as_str().unwrap();
    assert!(
        progress.lines().any(|l| l.starts_with(&format!("job {id}: processing ")) && l.ends_with(" of 6.0 MiB")),
        "{progress}"
    );
    assert!(progress.lines().last().unwrap().starts_with(&format!("job {id}: completed")), "{progress}");
    assert!(!progress.contains('\u{1b}'), "no terminal escapes when piped: {progress:?}");

    // A job that fails: non-zero exit, the error on standard error.
    let out =
        cli(&server.base, &["submit", &origin.url("/status/404"), "--bucket", "cli", "--key", "gone", "--wait"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("origin answered HTTP 404"), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).lines().any(|l| l.starts_with("status") && l.ends_with("failed")),
        "{}",
        text(&out.stdout)
    );
    let failed =
        text(&out.stdout).lines().find(|l| l.starts_with("id")).unwrap().split_whitespace().last().unwrap().to_owned();

    // jobs, job, retry, url, cancel.
    let out = cli(&server.base, &["jobs", "--status", "completed"]).await;
    let listing = text(&out.stdout);
    assert!(out.status.success() && listing.contains("cli/slow.bin") && !listing.contains("cli/gone"), "{listing}");
    let out = cli(&server.base, &["job", id, "--output", "json"]).await;
    assert_eq!(json_of(&out)["object_name"], "slow.bin");
    let out = cli(&server.base, &["url", id, "--expires-in", "5m"]).await;
    let link = text(&out.stdout);
    let stored = reqwest::get(link.trim()).await.unwrap().bytes().await.unwrap();
    assert!(stored == content(3, size), "the link serves the object");
    let out = cli(&server.base, &["retry", &failed, "--output", "json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_of(&out)["retry_count"], 0);
    let out = cli(&server.base, &["cancel", id]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("wrong_state"), "a finished job cannot be cancelled: {}", text(&out.stderr));
    let out = cli("http://127.0.0.1:9", &["jobs"]).await;
    assert!(!out.status.success() && text(&out.stderr).contains("cannot reach fileflow"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_url_list_is_submitted_and_followed() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let list = dir.path().join("list.tsv");
    let lines: Vec<String> =
        (1..=3).map(|i| format!("{}\t{}", origin.url(&format!("/file/{}?seed={i}", 1000 * i)), 1000 * i)).collect();
    std::fs::write(&list, format!("TsvHttpData-1.0\n{}\n", lines.join("\n"))).unwrap();
    let out = cli(
        &server.base,
        &[
            "submit",
            "--from",
            list.to_str().unwrap(),
            "--bucket",
            "lists",
            "--prefix",
            "in/",
            "--wait",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jobs = json_of(&out)["uploads"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3);
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["size"], 1000 * (i as u64 + 1), "{job}");
        assert!(job["object_name"].as_str().unwrap().starts_with("in/127.0.0.1"), "{job}");
    }
}

#[tokio::test]
async fn on_a_terminal_submit_wait_draws_a_progress_bar() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let url = origin.url("/slow/4194304?every_ms=20&seed=4");
    let command = format!(
        "FILEFLOW_SERVER={} {} submit '{url}' --bucket cli --key tty.bin --wait",
        server.base,
        env!("CARGO_BIN_EXE_fileflow")
    );
    // `script` runs the command on a pseudo-terminal and copies what it drew.
    let out = tokio::process::Command::new("script").args(["-qec", &command, "/dev/null"]).output().await.unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("ETA"), "a bar with an ETA: {screen:?}");
    assert!(screen.contains("MiB/4 MiB") || screen.contains("MiB/4.00 MiB"), "bytes of the total: {screen:?}");
    assert!(screen.contains("/s"), "a rate: {screen:?}");
    assert!(screen.contains("completed"), "{screen:?}");
    std::fs::write(env!("CARGO_TARGET_TMPDIR").to_owned() + "/cli-terminal.txt", &screen).unwrap();
}

#[tokio::test]
async fn with_umask_000_the_data_dir_and_database_are_still_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // `keys create` is often the first command: it creates the data dir and the database.
    let out = tokio::process::Command::new("sh")
        .args(["-c", "umask 000 && exec \"$0\" keys create --name ops --role admin", env!("CARGO_BIN_EXE_fileflow")])
        .env("FILEFLOW_DATA_DIR", &data_dir)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = |name: &str| std::fs::metadata(data_dir.join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("fileflow.db"), 0o600);
    for entry in std::fs::read_dir(&data_dir).unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap();
        let expected = if entry.path().is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&name), expected, "{name}");
    }
}

#[tokio::test]
async fn batch_submit_sends_a_local_manifest_follows_the_batch_and_the_report_lands_in_the_store() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let rows = 300;
    let manifest = dir.path().join("files.csv");
    let mut text_rows = vec!["file_url,object_name,size".to_owned()];
    for i in 0..rows {
        text_rows.push(format!("{},in/{i}.bin,{}", origin.url(&format!("/file/{}?seed={i}", 100 + i)), 100 + i));
    }
    std::fs::write(&manifest, text_rows.join("\n") + "\n").unwrap();
    let out = cli(
        &server.base,
        &[
            "batch",
            "submit",
            manifest.to_str().unwrap(),
            "--bucket",
            "bulk",
            "--report",
            "reports/files.csv",
            "--wait",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let batch = json_of(&out);
    assert_eq!((batch["status"].as_str(), batch["total"].as_u64()), (Some("completed"), Some(rows)), "{batch}");
    assert_eq!(batch["counts"]["completed"], rows, "{batch}");
    assert_eq!(batch["report"]["written"], true, "{batch}");
    // Piped, progress comes as plain lines: the batch's rows done out of its total.
    let id = batch["id"].as_str().unwrap();
    let progress = text(&out.stderr);
    assert!(
        progress.lines().last().unwrap().starts_with(&format!("batch {id}: completed {rows}/{rows} rows done")),
        "{progress}"
    );
    // The manifest was kept in the bucket, the objects are the origin's, the report has a row each.
    let objects = dir.path().join("objects").join("bulk");
    let kept = batch["manifest"]["object_name"].as_str().unwrap();
    assert!(kept.starts_with("manifests/") && kept.ends_with("-files.csv"), "{batch}");
    assert_eq!(std::fs::read(objects.join(kept)).unwrap(), std::fs::read(&manifest).unwrap());
    assert_eq!(std::fs::read(objects.join("in/7.bin")).unwrap(), content(7, 107));
    let report = std::fs::read_to_string(objects.join("reports/files.csv")).unwrap();
    assert_eq!(report.lines().count(), 1 + rows as usize, "{report}");
    assert!(report.lines().skip(1).all(|l| l.contains(",completed,")), "{report}");

    // A manifest with a row that cannot be a job: the batch ends, the exit says not all completed.
    std::fs::write(
        &manifest,
        format!("file_url,object_name\n{},ok.bin\nftp://example.com/x,bad.bin\n", origin.url("/file/10")),
    )
    .unwrap();
    let out = cli(
        &server.base,
        &["batch", "submit", manifest.to_str().unwrap(), "--bucket", "bulk", "--manifest-key", "m2.csv", "--wait"],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let shown = text(&out.stdout);
    assert!(shown.lines().any(|l| l.starts_with("invalid") && l.ends_with(" 1")), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("completed") && l.ends_with(" 1")), "{shown}");
    let out = cli(&server.base, &["batch", "list"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3, "a header and two batches: {}", text(&out.stdout));
    // Bad input: no bucket for a local manifest, a manifest that is not there.
    let out = cli(&server.base, &["batch", "submit", manifest.to_str().unwrap()]).await;
    assert!(!out.status.success() && text(&out.stderr).contains("--bucket is required"), "{}", text(&out.stderr));
    let out = cli(&server.base, &["batch", "submit", "/nonexistent/m.csv", "--bucket", "bulk"]).await;
    assert!(!out.status.success() && text(&out.stderr).contains("cannot read"), "{}", text(&out.stderr));
}
