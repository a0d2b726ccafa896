//! The audit store: Parquet files on an object store (a local directory by default, an
//! S3-compatible bucket by URL), laid out `org_id=<org>/day=<YYYY-MM-DD>/<file>` so queries
//! and retention work per org and day.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// The table name `medallion audit query` exposes.
pub const TABLE: &str = "audit_events";

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("audit store `{location}`: {message}")]
    Open { location: String, message: String },
    #[error("audit store: {0}")]
    Io(#[from] object_store::Error),
    #[error("audit store: {0}")]
    Parquet(String),
    #[error("query: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
}

/// An opened audit store.
#[derive(Debug, Clone)]
pub struct AuditStore {
    store: Arc<dyn ObjectStore>,
    /// The table URL DataFusion lists (`file:///dir/` or `s3://bucket/prefix/`).
    table_url: String,
    /// The object store's own base URL, for DataFusion's registry.
    base_url: url::Url,
    /// Set for a local directory: files are fsynced before they count as written.
    local_root: Option<PathBuf>,
    /// Key prefix inside the bucket (empty for a local directory).
    prefix: String,
}

impl AuditStore {
    /// Opens `location`: a directory path (created if missing), `file:///dir`, or
    /// `s3://bucket[/prefix]` (credentials, region and endpoint from the usual `AWS_*`
    /// environment variables, so any S3-compatible store works).
    pub fn open(location: &str) -> Result<Self, StoreError> {
        let error = |message: String| StoreError::Open {
            location: location.to_string(),
            message,
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(error("no bucket in the URL".into()));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| error(e.to_string()))?;
            let prefix = prefix.trim_matches('/').to_string();
            let base_url =
                url::Url::parse(&format!("s3://{bucket}")).map_err(|e| error(e.to_string()))?;
            let table_url = if prefix.is_empty() {
                format!("s3://{bucket}/")
            } else {
                format!("s3://{bucket}/{prefix}/")
            };
            return Ok(Self {
                store: Arc::new(store),
                table_url,
                base_url,
                local_root: None,
                prefix,
            });
        }
        let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        if location.contains("://") && !location.starts_with("file://") {
            return Err(error(
                "use a directory, file:///dir or s3://bucket/prefix".into(),
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|e| error(e.to_string()))?;
        let dir = dir.canonicalize().map_err(|e| error(e.to_string()))?;
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| error(e.to_string()))?;
        let table_url = format!("file://{}/", dir.display());
        let base_url = url::Url::parse("file:///").map_err(|e| error(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            table_url,
            base_url,
            local_root: Some(dir),
            prefix: String::new(),
        })
    }

    /// Where the store is, as given to DataFusion.
    pub fn url(&self) -> &str {
        &self.table_url
    }

    fn key(&self, relative: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(relative)
        } else {
            Path::from(format!("{}/{relative}", self.prefix))
        }
    }

    /// Writes `bytes` at `relative` (replacing what is there); returns once it is durable.
    pub async fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(&self.key(relative), PutPayload::from(bytes))
            .await?;
        if let Some(root) = &self.local_root {
            // The local store renames a complete temporary file into place; make it durable.
            let path = root.join(relative);
            let sync = move || -> std::io::Result<()> {
                std::fs::File::open(&path)?.sync_all()?;
                if let Some(parent) = path.parent() {
                    std::fs::File::open(parent)?.sync_all()?;
                }
                Ok(())
            };
            tokio::task::spawn_blocking(sync)
                .await
                .map_err(|e| StoreError::Parquet(e.to_string()))?
                .map_err(|e| StoreError::Parquet(format!("fsync {relative}: {e}")))?;
        }
        Ok(())
    }

    /// The object at `relative`, if it exists.
    pub async fn get(&self, relative: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.store.get(&self.key(relative)).await {
            Ok(r) => Ok(Some(r.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every Parquet file, relative to the store, sorted.
    pub async fn files(&self) -> Result<Vec<String>, StoreError> {
        let prefix = (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()));
        let mut out: Vec<String> = self
            .store
            .list(prefix.as_ref())
            .map_ok(|m| m.location.to_string())
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter(|p| p.ends_with(".parquet"))
            .map(|p| {
                p.strip_prefix(&format!("{}/", self.prefix))
                    .map(str::to_string)
                    .unwrap_or(p)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Runs `sql` over table [`TABLE`] (every file; `org_id` and `day` come from the layout).
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, StoreError> {
        let ctx = SessionContext::new();
        ctx.register_object_store(&self.base_url, self.store_for_datafusion());
        let url = ListingTableUrl::parse(&self.table_url)?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![
                ("org_id".to_string(), DataType::Int64),
                ("day".to_string(), DataType::Utf8),
            ]);
        if self.files().await?.is_empty() {
            // An empty store has no schema to infer: answer over the empty table.
            let table = arrow::array::RecordBatch::new_empty(super::parquet_schema());
            ctx.register_batch(TABLE, table)?;
        } else {
            // The table has today's columns; files written before a column existed read it as
            // null.
            let config = ListingTableConfig::new(url)
                .with_listing_options(options)
                .with_schema(super::parquet_schema());
            ctx.register_table(TABLE, Arc::new(ListingTable::try_new(config)?))?;
        }
        Ok(ctx.sql(sql).await?.collect().await?)
    }

    fn store_for_datafusion(&self) -> Arc<dyn ObjectStore> {
        match &self.local_root {
            // DataFusion addresses local files by absolute path.
            Some(_) => Arc::new(LocalFileSystem::new()),
            None => self.store.clone(),
        }
    }

    /// Removes every `day=` partition older than `days` before `today` (`YYYY-MM-DD`); returns
    /// the partitions removed (or that would be, with `dry_run`).
    pub async fn retain(
        &self,
        days: u32,
        today: &str,
        dry_run: bool,
    ) -> Result<Vec<String>, StoreError> {
        let cutoff = super::day_of_ms(
            super::ms_of_day(today).ok_or_else(|| {
                StoreError::Parquet(format!("`{today}` is not a YYYY-MM-DD date"))
            })? - i64::from(days) * 86_400_000,
        );
        let mut removed = Vec::new();
        let mut doomed = Vec::new();
        for file in self.files().await? {
            let Some(day) = file
                .split('/')
                .find_map(|part| part.strip_prefix("day="))
                .map(str::to_string)
            else {
                continue;
            };
            if day.as_str() < cutoff.as_str() {
                let partition = file
                    .rsplit_once('/')
                    .map_or(file.clone(), |(d, _)| d.to_string());
                if !removed.contains(&partition) {
                    removed.push(partition);
                }
                doomed.push(file);
            }
        }
        if !dry_run {
            for file in &doomed {
                self.store.delete(&self.key(file)).await?;
            }
            if let Some(root) = &self.local_root {
                // Empty directories left behind would still be listed by DataFusion.
                for partition in &removed {
                    let _ = std::fs::remove_dir(root.join(partition));
                    if let Some((org, _)) = partition.split_once('/') {
                        let _ = std::fs::remove_dir(root.join(org));
                    }
                }
            }
        }
        removed.sort();
        Ok(removed)
    }
}
