//! A batch's completion report: a CSV object, one row per manifest row, streamed into the
//! store page by page (jobs and invalid rows merged by row number), never whole in memory.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::StreamExt as _;

use super::request::Location;
use crate::lifecycle::JobError;
use crate::metadata::{Batch, ReportRow};
use crate::storage::{Unfenced, WriteOptions};

use crate::http::state::AppState;

/// The report's header row.
pub const HEADER: &str = "row,file_url,bucket_name,object_name,status,size,sha256,etag,last_error\n";
/// Rows read from the database per page.
const PAGE: u32 = 1000;

/// Write `batch`'s report at `location`; `Err` says why it could not be.
pub async fn write_report(state: &AppState, batch: &Batch, location: &Location) -> Result<(), String> {
    let (bucket, key) = location.parse().map_err(|e| format!("report: {e}"))?;
    let pages = Pages { id: batch.id, ..Pages::default_for(state) };
    let body = futures::stream::once(async { Ok(Bytes::from_static(HEADER.as_bytes())) })
        .chain(futures::stream::unfold(pages, |mut pages| async move {
            match pages.next_page().await {
                Ok(Some(text)) => Some((Ok(Bytes::from(text)), pages)),
                Ok(None) => None,
                Err(e) => Some((Err(JobError::transient(format!("reading the batch's rows: {e}"))), pages.ended())),
            }
        }))
        .boxed();
    // The open API and admin keys may create the bucket, as for their jobs.
    let may_create_bucket = batch.owner.is_none();
    let options = WriteOptions { content_type: "text/csv", may_create_bucket, length: None };
    state.store.put(&bucket, &key, options, body, &Unfenced).await.map_err(|e| format!("writing the report: {e}"))?;
    tracing::info!(batch_id = batch.id, bucket = %bucket.as_str(), key = %key.as_str(), "batch report written");
    Ok(())
}

/// Where the report's reading stands.
struct Pages {
    state: AppState,
    id: i64,
    after_job: i64,
    after_invalid: u64,
    jobs: VecDeque<ReportRow>,
    invalid: VecDeque<ReportRow>,
    jobs_done: bool,
    invalid_done: bool,
    done: bool,
}

impl Pages {
    fn default_for(state: &AppState) -> Self {
        Self {
            state: state.clone(),
            id: 0,
            after_job: 0,
            after_invalid: 0,
            jobs: VecDeque::new(),
            invalid: VecDeque::new(),
            jobs_done: false,
            invalid_done: false,
            done: false,
        }
    }

    fn ended(mut self) -> Self {
        self.done = true;
        self
    }

    /// The next rows of CSV, in row order; `None` at the end.
    async fn next_page(&mut self) -> Result<Option<String>, crate::metadata::RepoError> {
        if self.done {
            return Ok(None);
        }
        let mut text = String::new();
        for _ in 0..PAGE {
            if self.jobs.is_empty() && !self.jobs_done {
                let page = self.state.bulk.report_jobs(self.id, self.after_job, PAGE).await?;
                self.jobs_done = page.len() < PAGE as usize;
                if let Some((id, _)) = page.last() {
                    self.after_job = *id;
                }
                self.jobs.extend(page.into_iter().map(|(_, row)| row));
            }
            if self.invalid.is_empty() && !self.invalid_done {
                let page = self.state.bulk.invalid_rows(self.id, self.after_invalid, PAGE).await?;
                self.invalid_done = page.len() < PAGE as usize;
                if let Some(last) = page.last() {
                    self.after_invalid = last.row;
                }
                self.invalid.extend(page.into_iter().map(|r| ReportRow {
                    row: r.row,
                    file_url: r.file_url.unwrap_or_default(),
                    bucket_name: String::new(),
                    object_name: String::new(),
                    status: "invalid".into(),
                    size: None,
                    sha256: None,
                    etag: None,
                    last_error: Some(r.reason),
                }));
            }
            let next = match (self.jobs.front(), self.invalid.front()) {
                (Some(job), Some(invalid)) if invalid.row < job.row => self.invalid.pop_front(),
                (Some(_), _) => self.jobs.pop_front(),
                (None, Some(_)) => self.invalid.pop_front(),
                (None, None) => break,
            };
            if let Some(row) = next {
                csv_row(&mut text, &row);
            }
        }
        if text.is_empty() {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(text))
    }
}

/// One report row as a CSV line.
fn csv_row(out: &mut String, row: &ReportRow) {
    let fields = [
        row.row.to_string(),
        row.file_url.clone(),
        row.bucket_name.clone(),
        row.object_name.clone(),
        row.status.clone(),
        row.size.map(|s| s.to_string()).unwrap_or_default(),
        row.sha256.clone().unwrap_or_default(),
        row.etag.clone().unwrap_or_default(),
        row.last_error.clone().unwrap_or_default(),
    ];
    let quoted: Vec<String> = fields.iter().map(|f| quote(f)).collect();
    out.push_str(&quoted.join(","));
    out.push('\n');
}

/// A CSV field, quoted when it must be.
fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a,b"), "\"a,b\"");
        assert_eq!(quote("say \"x\""), "\"say \"\"x\"\"\"");
    }
}
