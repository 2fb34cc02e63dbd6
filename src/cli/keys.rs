//! `fileflow keys create | list | revoke`: manage API keys in the configured database.

use std::io::Write;

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use serde_json::json;

use crate::auth::{ApiKey, IssuedKey, KeyLimits, NewKey, Scope};
use crate::backends::open_database;
use crate::config::{DataArgs, KeysCommand, OutputFormat};

/// Carry out `action`, writing what it did to `out`.
pub async fn run(settings: &DataArgs, action: KeysCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    crate::files::create_dir(&settings.data_dir, settings.file_mode)
        .with_context(|| format!("cannot create {}", settings.data_dir.display()))?;
    let keys = open_database(settings).await?.keys();
    match action {
        KeysCommand::Create {
            name,
            role,
            buckets,
            rate_limit,
            max_unfinished,
            file_size_limit,
            weight,
            notify_url,
            output,
        } => {
            let scope = Scope::parse(&buckets).map_err(|e| anyhow::anyhow!("--buckets: {e}"))?;
            anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
            let limits =
                KeyLimits { rate_limit, max_unfinished, max_file_size: file_size_limit.map(|s| s.as_u64()), weight };
            let issued = IssuedKey::generate();
            let notify_url = notify_url
                .map(|url| crate::domain::SourceUrl::parse(url.as_str()).map(|u| u.as_str().to_owned()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--notify-url: {e}"))?;
            let key = keys.create_key(&issued, &NewKey { name, role, scope, limits, notify_url }, Utc::now()).await?;
            match output {
                OutputFormat::Json => {
                    let mut shown = view(&key);
                    shown["key"] = json!(issued.key);
                    writeln!(out, "{shown}")?;
                }
                OutputFormat::Table => {
                    writeln!(out, "Created {} key {} ({}).", key.role.as_str(), key.id, key.name)?;
                    writeln!(out, "Its secret is shown only now; keep it somewhere safe:\n\n  {}\n", issued.key)?;
                    writeln!(out, "Send it as `Authorization: Bearer <key>` on every /api/ request.")?;
                }
            }
        }
        KeysCommand::List { output } => {
            let all = keys.list_keys().await?;
            match output {
                OutputFormat::Json => writeln!(out, "{}", json!(all.iter().map(view).collect::<Vec<_>>()))?,
                OutputFormat::Table => {
                    writeln!(
                        out,
                        "{:<12}  {:<20}  {:<9}  {:<24}  {:<20}  STATE",
                        "ID", "NAME", "ROLE", "BUCKETS", "CREATED"
                    )?;
                    for key in &all {
                        let buckets =
                            if key.scope.entries().is_empty() { "*".to_owned() } else { key.scope.entries().join(",") };
                        let state = key.revoked_at.map_or("active".to_owned(), |at| format!("revoked {}", time(at)));
                        writeln!(
                            out,
                            "{:<12}  {:<20}  {:<9}  {:<24}  {:<20}  {state}",
                            key.id,
                            key.name,
                            key.role.as_str(),
                            buckets,
                            time(key.created_at)
                        )?;
                    }
                }
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(keys.revoke_key(&id, Utc::now()).await?, "no active key with id {id:?}");
            writeln!(out, "Revoked key {id}: it is refused from the next request on.")?;
        }
    }
    Ok(())
}

fn time(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A key as `keys list --output json` and `keys create --output json` show it.
fn view(key: &ApiKey) -> serde_json::Value {
    json!({
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "buckets": key.scope.entries(),
        "rate_limit": key.limits.rate_limit,
        "max_unfinished": key.limits.max_unfinished,
        "max_file_size": key.limits.max_file_size,
        "weight": key.limits.weight.unwrap_or(1),
        "notify_url": key.notify_url,
        "created_at": time(key.created_at),
        "revoked_at": key.revoked_at.map(time),
    })
}
