//! Pipeline locks and idempotency keys against a real Redis (127.0.0.1:6379, or
//! SLUICE_TEST_REDIS_URL); every test works under its own key prefix and deletes it.

use std::time::Duration;

use sluice_workers::coord::{Acquired, Lease, RedisLocks};

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn locks() -> RedisLocks {
    let prefix = format!("sluice-test-{}", uuid::Uuid::now_v7().simple());
    RedisLocks::connect(&redis_url(), &prefix)
        .await
        .expect("Redis must be reachable (scripts/services starts it)")
}

#[tokio::test]
async fn one_holder_at_a_time_and_a_second_trigger_joins_its_run() {
    let l = locks().await;
    let ttl = Duration::from_secs(10);
    let Acquired::Held(lease) = l
        .acquire("acme", "invoices", "run-1", ttl)
        .await
        .expect("acquire")
    else {
        panic!("free lock not taken")
    };
    assert_eq!(
        l.acquire("acme", "invoices", "run-2", ttl)
            .await
            .expect("acquire"),
        Acquired::Busy {
            run_id: "run-1".into()
        }
    );
    assert!(
        matches!(
            l.acquire("acme", "bills", "run-3", ttl)
                .await
                .expect("acquire"),
            Acquired::Held(_)
        ),
        "other pipelines are independent"
    );
    assert!(
        matches!(
            l.acquire("globex", "invoices", "run-4", ttl)
                .await
                .expect("acquire"),
            Acquired::Held(_)
        ),
        "other tenants are independent"
    );

    let forged = Lease {
        token: "not-the-token".into(),
        ..lease.clone()
    };
    assert!(
        !l.release(&forged, ttl).await.expect("release").was_ours(),
        "only the holder can release"
    );
    assert!(l.renew(&lease, ttl).await.expect("renew"));
    assert!(l.release(&lease, ttl).await.expect("release").was_ours());
    assert!(matches!(
        l.acquire("acme", "invoices", "run-5", ttl)
            .await
            .expect("acquire"),
        Acquired::Held(_)
    ));
    l.clear_prefix().await.expect("cleanup");
}

#[tokio::test]
async fn an_expired_lease_cannot_be_renewed_or_released_by_its_old_holder() {
    let l = locks().await;
    let Acquired::Held(old) = l
        .acquire("acme", "invoices", "run-1", Duration::from_millis(100))
        .await
        .expect("acquire")
    else {
        panic!()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Acquired::Held(new) = l
        .acquire("acme", "invoices", "run-2", Duration::from_secs(10))
        .await
        .expect("acquire")
    else {
        panic!("expired lock not taken")
    };
    assert!(!l.renew(&old, Duration::from_secs(10)).await.expect("renew"));
    assert!(
        !l.release(&old, Duration::from_secs(1))
            .await
            .expect("release")
            .was_ours()
    );
    assert_eq!(
        l.acquire("acme", "invoices", "run-3", Duration::from_secs(10))
            .await
            .expect("acquire"),
        Acquired::Busy {
            run_id: new.run_id.clone()
        }
    );
    l.clear_prefix().await.expect("cleanup");
}

#[tokio::test]
async fn ten_concurrent_triggers_make_one_run() {
    let l = locks().await;
    let attempts = (0..10).map(|i| {
        let l = l.clone();
        tokio::spawn(async move {
            l.acquire(
                "acme",
                "invoices",
                &format!("run-{i}"),
                Duration::from_secs(10),
            )
            .await
            .expect("acquire")
        })
    });
    let mut held = Vec::new();
    let mut joined = Vec::new();
    for a in attempts {
        match a.await.expect("task") {
            Acquired::Held(lease) => held.push(lease.run_id),
            Acquired::Busy { run_id } => joined.push(run_id),
            other => panic!("no key was given and no run was waiting: {other:?}"),
        }
    }
    assert_eq!(held.len(), 1, "exactly one trigger starts a run");
    assert!(
        joined.iter().all(|r| *r == held[0]),
        "the other nine join it: {joined:?}"
    );
    l.clear_prefix().await.expect("cleanup");
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_run() {
    let l = locks().await;
    assert_eq!(
        l.remember("acme", "key-1", "run-1")
            .await
            .expect("remember"),
        "run-1"
    );
    assert_eq!(
        l.remember("acme", "key-1", "run-2")
            .await
            .expect("remember"),
        "run-1"
    );
    assert_eq!(
        l.remember("globex", "key-1", "run-3")
            .await
            .expect("remember"),
        "run-3",
        "keys are per tenant"
    );
    l.clear_prefix().await.expect("cleanup");
}
