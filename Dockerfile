# Multi-stage build: compile fileflow, then ship only the binary on a slim base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
COPY tests ./tests
COPY vendor ./vendor
RUN cargo build --release --locked --bin fileflow

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/fileflow --create-home fileflow
COPY --from=build /src/target/release/fileflow /usr/local/bin/fileflow
USER fileflow
WORKDIR /var/lib/fileflow
ENV FILEFLOW_LISTEN=0.0.0.0:8000 FILEFLOW_DATA_DIR=/var/lib/fileflow FILEFLOW_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["fileflow"]
CMD ["serve"]
