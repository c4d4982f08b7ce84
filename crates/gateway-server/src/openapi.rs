//! The REST API as an OpenAPI 3.1 document, served at `/api/openapi.json` and checked in as
//! `docs/openapi.json`. The schemas come from the Rust types the handlers use (their JSON
//! Schema, via `schemars`), so the document cannot drift from what the server sends; the
//! routes are listed here, next to one another.

use gateway_model::{
    AdaptRequest, ClusterDetails, ClusterEvents, ClusterModel, CreateClusterRequest,
    CreateClusterResponse, ErrorBody, Heartbeat, OptionsResponse, ScaleRequest, ScaleResponse,
    UsageReport,
};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

/// Who may call a route.
#[derive(Clone, Copy)]
enum Access {
    /// Anyone.
    Open,
    /// A signed-in user (their own clusters; admins: all).
    User,
    /// A signed-in admin.
    Admin,
    /// The cluster's own API token (its scheduler).
    ClusterToken,
    /// A signed-in user, or the cluster's own token.
    UserOrClusterToken,
}

/// One operation of the document.
struct Route {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    access: Access,
    /// Query parameters: name, schema type, description.
    query: &'static [(&'static str, &'static str, &'static str)],
    /// Request body schema (a component name).
    body: Option<&'static str>,
    /// Success status and its body: a component name, `None` for no body, or a media type.
    ok: (u16, Answer),
    /// Other statuses the route answers with `ErrorBody`.
    errors: &'static [u16],
}

#[derive(Clone, Copy)]
enum Answer {
    Schema(&'static str),
    Map(&'static str),
    Empty,
    Media(&'static str, &'static str),
    Object(&'static str),
}

const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/api/health",
        summary: "Whether the gateway and its backend answer (503 when the backend does not).",
        access: Access::Open,
        query: &[],
        body: None,
        ok: (200, Answer::Object("{\"status\": \"pass\"}")),
        errors: &[503],
    },
    Route {
        method: "get",
        path: "/api/version",
        summary: "The gateway's version.",
        access: Access::Open,
        query: &[],
        body: None,
        ok: (200, Answer::Object("{\"version\": \"...\"}")),
        errors: &[],
    },
    Route {
        method: "get",
        path: "/api/v1/options",
        summary: "The cluster options of the caller's group policy.",
        access: Access::User,
        query: &[],
        body: None,
        ok: (200, Answer::Schema("OptionsResponse")),
        errors: &[401],
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/",
        summary: "The caller's clusters (every cluster for admins), keyed by name; with \
                  `details`, as ClusterDetails.",
        access: Access::User,
        query: &[
            (
                "status",
                "string",
                "Comma-separated statuses (default: pending,running).",
            ),
            (
                "details",
                "boolean",
                "Answer ClusterDetails (owner, group, reason, workers) instead.",
            ),
        ],
        body: None,
        ok: (200, Answer::Map("ClusterModel")),
        errors: &[401, 422],
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/",
        summary: "Create a cluster.",
        access: Access::User,
        query: &[],
        body: Some("CreateClusterRequest"),
        ok: (201, Answer::Schema("CreateClusterResponse")),
        errors: &[401, 403, 415, 422, 503],
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/{name}",
        summary: "One cluster; with `wait`, held up to 20 s while PENDING.",
        access: Access::User,
        query: &[("wait", "boolean", "Hold while the cluster is PENDING.")],
        body: None,
        ok: (200, Answer::Schema("ClusterModel")),
        errors: &[401, 403, 404],
    },
    Route {
        method: "delete",
        path: "/api/v1/clusters/{name}",
        summary: "Stop a cluster (idempotent).",
        access: Access::UserOrClusterToken,
        query: &[],
        body: None,
        ok: (204, Answer::Empty),
        errors: &[401, 403, 404],
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/{name}/details",
        summary: "A cluster's details: owner, group policy, reason, workers, cores, memory.",
        access: Access::User,
        query: &[],
        body: None,
        ok: (200, Answer::Schema("ClusterDetails")),
        errors: &[401, 403, 404],
    },
    Route {
        method: "get",
        path: "/api/v1/clusters/{name}/events",
        summary: "What happened to a cluster, oldest first; with `follow`, a stream of \
                  server-sent events (`event: cluster-event`) until it has finished.",
        access: Access::User,
        query: &[(
            "follow",
            "boolean",
            "Stream new events as server-sent events.",
        )],
        body: None,
        ok: (200, Answer::Schema("ClusterEvents")),
        errors: &[401, 403, 404, 429],
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{name}/scale",
        summary: "Set the number of workers (clipped to limits and quotas, said in `msg`).",
        access: Access::User,
        query: &[],
        body: Some("ScaleRequest"),
        ok: (200, Answer::Schema("ScaleResponse")),
        errors: &[401, 403, 404, 409, 415, 422],
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{name}/adapt",
        summary: "Scale adaptively between bounds.",
        access: Access::User,
        query: &[],
        body: Some("AdaptRequest"),
        ok: (200, Answer::Schema("ScaleResponse")),
        errors: &[401, 403, 404, 409, 415, 422],
    },
    Route {
        method: "post",
        path: "/api/v1/clusters/{name}/heartbeat",
        summary: "The scheduler's heartbeat.",
        access: Access::ClusterToken,
        query: &[],
        body: Some("Heartbeat"),
        ok: (200, Answer::Empty),
        errors: &[401, 404, 422],
    },
    Route {
        method: "get",
        path: "/api/v1/usage",
        summary: "Core- and memory-seconds per user, group or cluster within a window \
                  (a user's own; every user's for admins).",
        access: Access::User,
        query: &[
            (
                "since",
                "string",
                "Window start: RFC 3339, a UTC date, or ms since 1970.",
            ),
            ("until", "string", "Window end (default: now)."),
            ("by", "string", "user (default), group or cluster."),
            ("user", "string", "Only this user's clusters."),
            ("format", "string", "json (default) or csv."),
        ],
        body: None,
        ok: (200, Answer::Schema("UsageReport")),
        errors: &[401, 403, 422],
    },
    Route {
        method: "get",
        path: "/api/v1/me",
        summary: "Who the gateway takes the caller for.",
        access: Access::User,
        query: &[],
        body: None,
        ok: (
            200,
            Answer::Object("{\"name\", \"admin\", \"groups\", \"policy\"}"),
        ),
        errors: &[401],
    },
    Route {
        method: "get",
        path: "/api/v1/overview",
        summary: "Clusters by status, workers wanted, API requests served, uptime.",
        access: Access::Admin,
        query: &[],
        body: None,
        ok: (
            200,
            Answer::Object(
                "{\"clusters\": {status: count}, \"workers\", \"api_requests\", \
                 \"uptime_seconds\"}",
            ),
        ),
        errors: &[401, 403],
    },
    Route {
        method: "get",
        path: "/metrics",
        summary: "Prometheus metrics (a bearer token when metrics.token_file is set).",
        access: Access::Open,
        query: &[],
        body: None,
        ok: (
            200,
            Answer::Media(
                "application/openmetrics-text",
                "OpenMetrics text exposition (version 1.0.0), ending with `# EOF`.",
            ),
        ),
        errors: &[401],
    },
];

fn security(access: Access) -> Value {
    let user = json!([{"basic": []}, {"bearer": []}, {"jupyterhub": []}, {"negotiate": []},
                      {"session": []}]);
    match access {
        Access::Open => json!([]),
        Access::User | Access::Admin => user,
        Access::ClusterToken => json!([{"clusterToken": []}]),
        Access::UserOrClusterToken => {
            let mut all = user.as_array().cloned().unwrap_or_default();
            all.push(json!({"clusterToken": []}));
            Value::Array(all)
        }
    }
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn operation(r: &Route) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), json!(r.summary));
    op.insert("security".into(), security(r.access));
    if matches!(r.access, Access::Admin) {
        op.insert("description".into(), json!("Admins only."));
    }
    let mut params: Vec<Value> = Vec::new();
    if r.path.contains("{name}") {
        params.push(json!({"name": "name", "in": "path", "required": true,
                           "description": "The cluster's name.", "schema": {"type": "string"}}));
    }
    for (name, kind, description) in r.query {
        params.push(json!({"name": name, "in": "query", "required": false,
                           "description": description, "schema": {"type": kind}}));
    }
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    if let Some(body) = r.body {
        op.insert(
            "requestBody".into(),
            json!({"required": true,
                   "content": {"application/json": {"schema": schema_ref(body)}}}),
        );
    }
    let mut responses = Map::new();
    let (status, answer) = r.ok;
    let ok = match answer {
        Answer::Schema(s) => json!({"description": "Success.",
            "content": {"application/json": {"schema": schema_ref(s)}}}),
        Answer::Map(s) => json!({"description": "Success: an object keyed by cluster name.",
            "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": schema_ref(s)}}}}),
        Answer::Empty => json!({"description": "Done; no body."}),
        Answer::Media(media, description) => json!({"description": description,
            "content": {media: {"schema": {"type": "string"}}}}),
        Answer::Object(shape) => json!({"description": format!("Success: {shape}."),
            "content": {"application/json": {"schema": {"type": "object"}}}}),
    };
    responses.insert(status.to_string(), ok);
    for code in r.errors {
        let description = match code {
            401 => "No or wrong credentials (with the method's challenge).",
            403 => "Not the caller's to see or change, a cross-site request, or a quota.",
            404 => "No such cluster.",
            409 => "The cluster is not running.",
            415 => "The body is not declared as JSON.",
            422 => "Invalid input; the message says what is wrong.",
            429 => "Too many open event streams.",
            503 => "The backend does not answer.",
            _ => "Error.",
        };
        responses.insert(
            code.to_string(),
            json!({"description": description,
                   "content": {"application/json": {"schema": schema_ref("ErrorBody")}}}),
        );
    }
    op.insert("responses".into(), Value::Object(responses));
    Value::Object(op)
}

fn add<T: JsonSchema>(gen: &mut SchemaGenerator) {
    gen.subschema_for::<T>();
}

/// The OpenAPI document (paths are below the gateway's `prefix`, given as the server URL).
pub fn document() -> Value {
    let mut gen = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    add::<ClusterModel>(&mut gen);
    add::<ClusterDetails>(&mut gen);
    add::<OptionsResponse>(&mut gen);
    add::<CreateClusterRequest>(&mut gen);
    add::<CreateClusterResponse>(&mut gen);
    add::<ScaleRequest>(&mut gen);
    add::<AdaptRequest>(&mut gen);
    add::<ScaleResponse>(&mut gen);
    add::<Heartbeat>(&mut gen);
    add::<ClusterEvents>(&mut gen);
    add::<UsageReport>(&mut gen);
    add::<ErrorBody>(&mut gen);
    let schemas = gen.take_definitions(true);
    let mut paths = Map::new();
    for r in ROUTES {
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(ops) = entry {
            ops.insert(r.method.into(), operation(r));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Dask Gateway (Rust) REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The API the stock dask-gateway client uses, and the gateway's own \
                            (details, events, usage). See docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "jupyterhub": {"type": "apiKey", "in": "header", "name": "Authorization",
                               "description": "`Authorization: jupyterhub <hub token>`"},
                "negotiate": {"type": "http", "scheme": "negotiate"},
                "session": {"type": "apiKey", "in": "cookie", "name": "dask-gateway-<id>",
                            "description": "The session cookie set on the first success."},
                "clusterToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                                 "description": "`Authorization: token <cluster API token>`"},
            },
        },
    })
}
