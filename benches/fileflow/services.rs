//! The servers `scripts/services.sh start` runs, found through its `FILEFLOW_TEST_*`
//! variables. A benchmark whose server is missing is left out of the report, with a note.

use fileflow::storage::{S3Settings, S3Store};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A name no earlier run used, for databases, topics, groups and buckets.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:x}{:04x}", std::process::id(), rand::random::<u16>())
}

#[derive(Clone)]
pub struct S3 {
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3 {
    pub fn from_env() -> Option<S3> {
        Some(S3 {
            endpoint: var("FILEFLOW_TEST_S3_ENDPOINT")?,
            region: var("FILEFLOW_TEST_S3_REGION")?,
            access_key: var("FILEFLOW_TEST_S3_ACCESS_KEY")?,
            secret_key: var("FILEFLOW_TEST_S3_SECRET_KEY")?,
        })
    }

    /// What a `fileflow` process needs to store into this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("FILEFLOW_STORAGE", "s3"),
            ("FILEFLOW_S3_ENDPOINT", &self.endpoint),
            ("AWS_REGION", &self.region),
            ("AWS_ACCESS_KEY_ID", &self.access_key),
            ("AWS_SECRET_ACCESS_KEY", &self.secret_key),
            ("FILEFLOW_CREATE_BUCKETS", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// fileflow's own S3 client, as the workers build it.
    pub fn store(&self) -> S3Store {
        S3Store::new(S3Settings {
            endpoint: Some(self.endpoint.parse().expect("FILEFLOW_TEST_S3_ENDPOINT is a URL")),
            public_endpoint: None,
            region: self.region.clone(),
            access_key_id: self.access_key.clone(),
            secret_access_key: self.secret_key.clone().into(),
            create_buckets: true,
            max_file_size: 5 << 30,
        })
    }

    /// An rclone remote named `bench` for this server, configured through the environment.
    pub fn rclone_env(&self) -> Vec<(String, String)> {
        [
            ("RCLONE_CONFIG_BENCH_TYPE", "s3"),
            ("RCLONE_CONFIG_BENCH_PROVIDER", "Other"),
            ("RCLONE_CONFIG_BENCH_ENDPOINT", &self.endpoint),
            ("RCLONE_CONFIG_BENCH_REGION", &self.region),
            ("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", &self.access_key),
            ("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", &self.secret_key),
            ("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// PostgreSQL and Kafka, for the distributed stack.
#[derive(Clone)]
pub struct Distributed {
    pub postgres_admin: String,
    pub kafka: String,
    pub s3: S3,
}

impl Distributed {
    pub fn from_env() -> Option<Distributed> {
        Some(Distributed {
            postgres_admin: var("FILEFLOW_TEST_POSTGRES")?,
            kafka: var("FILEFLOW_TEST_KAFKA")?,
            s3: S3::from_env()?,
        })
    }

    /// A fresh database, topic and consumer group; returns the environment of a
    /// `fileflow` process that uses them (and S3 if `s3`, else the local disk store), and
    /// the database URL.
    pub async fn fresh_stack(&self, partitions: u32, s3: bool) -> (Vec<(String, String)>, String) {
        let name = unique("bench");
        let admin = sqlx::PgPool::connect(&self.postgres_admin).await.expect("PostgreSQL answers");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("CREATE DATABASE");
        admin.close().await;
        let database = format!("{}/{name}", self.postgres_admin.rsplit_once('/').expect("a database URL").0);
        let mut env = vec![
            ("FILEFLOW_DATABASE_URL".to_owned(), database.clone()),
            ("FILEFLOW_KAFKA_BROKERS".to_owned(), self.kafka.clone()),
            ("FILEFLOW_KAFKA_TOPIC".to_owned(), name.clone()),
            ("FILEFLOW_KAFKA_GROUP".to_owned(), format!("{name}-workers")),
            ("FILEFLOW_KAFKA_PARTITIONS".to_owned(), partitions.to_string()),
        ];
        if s3 {
            env.extend(self.s3.env());
        }
        (env, database)
    }
}
