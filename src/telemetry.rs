//! Logs on stderr (text or JSON, filtered by `SLUICE_LOG`; errors only with `--quiet`;
//! coloured on a terminal unless `NO_COLOR` is set) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans
//! over OTLP/HTTP in protobuf: requests, jobs, runs and batches, each with the tenant,
//! pipeline, run and correlation ids sluice gives them. The exporter honours the usual
//! `OTEL_*` variables (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, ...).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::cli::LogFormat;

/// The tracer provider, flushed and shut down by [`Telemetry::shutdown`].
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered; called before the runtime goes away.
    pub(crate) fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: sending the last traces failed: {e}");
        }
    }
}

/// Installs the subscriber. `runtime` carries the exporter's requests: the SDK exports
/// from a thread of its own, outside the runtime.
pub(crate) fn init(format: LogFormat, quiet: bool, runtime: &tokio::runtime::Handle) -> Telemetry {
    let filter = if quiet {
        EnvFilter::new("error")
    } else {
        EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"))
    };
    // Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let stderr = fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    let stderr = match format {
        LogFormat::Json => stderr.json().with_filter(filter).boxed(),
        LogFormat::Text => stderr.with_filter(filter).boxed(),
    };
    let (provider, traces, problem) = match otlp_provider(runtime) {
        Ok(Some(provider)) => {
            // sluice's own spans at info and above, whatever SLUICE_LOG shows on stderr.
            let ours = Targets::new()
                .with_target("sluice", LevelFilter::INFO)
                .with_target("sluice_api", LevelFilter::INFO)
                .with_target("sluice_workers", LevelFilter::INFO)
                .with_target("sluice_pipelines", LevelFilter::INFO)
                .with_target("sluice_engine", LevelFilter::INFO)
                .with_target("sluice_connectors", LevelFilter::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("sluice"))
                .with_filter(ours);
            (Some(provider), Some(layer), None)
        }
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(traces)
        .init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "traces are not exported: the OTLP exporter could not be built");
    }
    Telemetry { provider }
}

fn otlp_provider(runtime: &tokio::runtime::Handle) -> Result<Option<SdkTracerProvider>, String> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(OnRuntime {
            client,
            runtime: runtime.clone(),
        })
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let resource = Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "sluice".to_string()),
        )
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The exporter's HTTP client: requests go out through reqwest on the program's runtime
/// (the SDK's export thread only waits for them).
#[derive(Debug, Clone)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: Request<bytes::Bytes>,
    ) -> Result<Response<bytes::Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let answer = client.execute(request).await?;
            let mut response = Response::builder().status(answer.status().as_u16());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            let body = answer.bytes().await?;
            Ok::<_, reqwest::Error>(response.body(body))
        });
        let answered = sent.await.map_err(|e| Box::new(e) as HttpError)?;
        let built = answered.map_err(|e| Box::new(e) as HttpError)?;
        built.map_err(|e| Box::new(e) as HttpError)
    }
}
