//! Sidekiq delivery against a real `redis-server`: the job shape GitLab's workers expect, queues,
//! namespaces, worker classes, and Redis going away.

mod common;

use common::delivery::*;

fn sidekiq_toml(redis: &str, fields: &str) -> String {
    format!(
        r#"
[[deliver]]
kind = "sidekiq"
redis_url = "{redis}"
concurrency = 2
timeout = "2s"
retry = ["1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
{fields}
"#
    )
}

/// Checks one Sidekiq payload; returns it parsed.
fn check_sidekiq_job(item: &str, class: &str, queue: &str, id: &str, raw: &[u8]) -> Value {
    let v: Value = serde_json::from_str(item).unwrap_or_else(|e| panic!("not JSON ({e}): {item}"));
    assert_eq!(v["class"], class, "{v}");
    assert_eq!(v["queue"], queue, "{v}");
    assert_eq!(v["retry"], false, "{v}");
    let args = v["args"].as_array().unwrap_or_else(|| panic!("args: {v}"));
    assert_eq!(args.len(), 1, "{v}");
    assert_eq!(args[0].as_str(), Some(String::from_utf8_lossy(raw).as_ref()), "args[0] is the raw message");
    let jid = v["jid"].as_str().unwrap_or_else(|| panic!("jid: {v}"));
    assert_eq!(jid.len(), 24, "{jid}");
    assert!(jid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "lowercase hex: {jid}");
    assert!(jid.ends_with(id), "jid {jid} ends with the job id {id}");
    assert!(v["enqueued_at"].is_f64(), "enqueued_at is a float: {v}");
    let at = v["enqueued_at"].as_f64().unwrap();
    assert!((at - unix_now() as f64).abs() < 60.0, "enqueued_at {at}");
    v
}

#[test]
fn sidekiq_lpush_has_the_shape_gitlab_expects() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = Env::start(|_| sidekiq_toml(&url, "queue = \"default\""), "");
    let id = env.send(&rcpt(), "sk1@example.org");
    let job = env.wait_state(&id, "done", None);
    assert_eq!(job["attempts"], 1);
    let items = redis.list("queue:default");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "EmailReceiverWorker", "default", &id, &env.raw(&id));
}

#[test]
fn sidekiq_namespace_service_desk_worker_and_worker_override() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = Env::start(
        |_| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"service_desk\"\naddress = \"contact+%{{key}}@localhost\"\nroutes = \"any\"\n\
                 [[mailbox]]\nname = \"custom\"\naddress = \"custom+%{{key}}@localhost\"\nroutes = \"any\"\n{}{}",
                sidekiq_toml(
                    &url,
                    "mailboxes = [\"incoming\", \"service_desk\"]\nqueue = \"email_receiver\"\nnamespace = \"resque:gitlab\""
                ),
                sidekiq_toml(&url, "mailboxes = [\"custom\"]\nqueue = \"custom_q\"\nworker = \"MyEmailWorker\"")
            )
        },
        "",
    );
    let incoming = env.send(&rcpt(), "ns-in@example.org");
    let desk = env.send("contact+group-project-abc@localhost", "ns-sd@example.org");
    let custom = env.send("custom+anything@localhost", "ns-custom@example.org");
    for id in [&incoming, &desk, &custom] {
        env.wait_state(id, "done", None);
    }
    let items = redis.list("resque:gitlab:queue:email_receiver");
    assert_eq!(items.len(), 2, "{items:?}");
    let by_jid: HashMap<String, &String> = items
        .iter()
        .map(|i| (serde_json::from_str::<Value>(i).unwrap()["jid"].as_str().unwrap_or("").to_string(), i))
        .collect();
    let find = |id: &str| -> &String {
        by_jid.iter().find(|(jid, _)| jid.ends_with(id)).map(|(_, i)| *i).unwrap_or_else(|| panic!("{id}: {items:?}"))
    };
    check_sidekiq_job(find(&incoming), "EmailReceiverWorker", "email_receiver", &incoming, &env.raw(&incoming));
    check_sidekiq_job(find(&desk), "ServiceDeskEmailReceiverWorker", "email_receiver", &desk, &env.raw(&desk));
    assert!(redis.list("queue:email_receiver").is_empty(), "the namespace prefixes the queue key");
    let items = redis.list("queue:custom_q");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "MyEmailWorker", "custom_q", &custom, &env.raw(&custom));
}

#[test]
fn sidekiq_redis_down_then_up_is_delivered() {
    let mut redis = RedisServer::start();
    redis.stop();
    let url = redis.url();
    let env = Env::start(|_| sidekiq_toml(&url, "queue = \"default\""), "");
    let id = env.send(&rcpt(), "sk-down@example.org");
    let job = env.wait_job(&id, "failed against a stopped redis", None, |j| {
        j["attempts"].as_u64() >= Some(1) && !j["last_error"].is_null()
    });
    assert_ne!(job["state"], "done", "{job}");
    assert_ne!(job["state"], "dead", "{job}");
    redis.start_again();
    let job = env.wait_state(&id, "done", None);
    assert!(job["attempts"].as_u64() >= Some(2), "{job}");
    let items = redis.list("queue:default");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "EmailReceiverWorker", "default", &id, &env.raw(&id));
}
