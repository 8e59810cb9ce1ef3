//! A concert's waiting room: the queue takes fans for a concert only once this service has
//! opened its line, at creation or, for concerts that predate that, when a replica starts.

use std::time::Duration;

use stagedoor_concert::ConcertConfig;
use stagedoor_proto::concert::v1::{
    self as pb, concert_admin_service_client::ConcertAdminServiceClient,
};
use stagedoor_runtime::db;
use stagedoor_testkit::eventually;
use tonic::Code;

use crate::{mesh, reason};

#[tokio::test]
async fn a_created_concert_takes_fans_and_a_made_up_one_does_not() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, _) = mesh.catalog(10).await;
    mesh.active_token(&concert_id, "fan").await;

    let refused = mesh.issue("concert-made-up", "fan").await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert_eq!(reason(&refused), "CONCERT_NOT_FOUND");
}

#[tokio::test]
async fn a_concert_that_predates_its_line_gets_one_when_a_replica_starts() {
    // The queue alone (a running concert replica's own pass could open the line first), and
    // the concert schema as its migrations leave it.
    let mesh = mesh(0, |_, _| {}).await;
    mesh.database
        .migrate(db::CONCERT, stagedoor_concert::app::migrator())
        .await;
    // A concert created before lines were opened at creation (or whose line a restored queue
    // database lost): the row exists, the queue knows nothing of it.
    let admin = mesh.database.admin().await;
    sqlx::query(
        "INSERT INTO concert.concerts (concert_id, title, artist, request_id)
         VALUES ('concert-old', 'Old Songs', 'The Archivists', 'old-request')",
    )
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let issue = || mesh.issue("concert-old", "fan");
    assert_eq!(reason(&issue().await.unwrap_err()), "CONCERT_NOT_FOUND");

    let config = ConcertConfig::new(mesh.database.url(db::CONCERT), mesh.queue_handle.url());
    let (_replica, _) =
        stagedoor_testkit::serve(|listener| stagedoor_concert::start(config, listener)).await;
    // The new replica opens every concert's line in the background, right after it starts.
    let what = "the new replica opens the old concert's line";
    eventually(Duration::from_secs(5), what, || async {
        match issue().await {
            Ok(_) => Some(()),
            Err(status) => {
                assert_eq!(reason(&status), "CONCERT_NOT_FOUND");
                None
            }
        }
    })
    .await;
}

#[tokio::test]
async fn create_concert_without_the_queue_is_unavailable_and_creates_nothing() {
    let mesh = mesh(1, |_, _| {}).await;
    // A replica whose queue is a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = ConcertConfig::new(mesh.database.url(db::CONCERT), nobody);
    let (_replica, channel) =
        stagedoor_testkit::serve(|listener| stagedoor_concert::start(config, listener)).await;
    let request = pb::CreateConcertRequest {
        title: "Unheard".into(),
        artist: "The Offline".into(),
        request_id: "create-while-queue-down".into(),
    };
    let refused = ConcertAdminServiceClient::new(channel)
        .create_concert(request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(reason(&refused), "QUEUE_UNAVAILABLE");
    let (concerts,): (i64,) = mesh
        .database
        .row("SELECT count(*) FROM concert.concerts")
        .await;
    assert_eq!(concerts, 0, "no concert without a waiting room");

    // The same request, retried where the queue answers, creates it, and it takes fans.
    let concert = mesh.concerts[0]
        .admin
        .clone()
        .create_concert(request)
        .await
        .unwrap()
        .into_inner()
        .concert
        .unwrap();
    mesh.active_token(&concert.concert_id, "fan").await;
}

#[tokio::test]
async fn add_schedule_refuses_bad_times_and_reused_keys_and_changes_nothing() {
    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, _) = mesh.catalog(10).await;
    let mut admin = mesh.concerts[0].admin.clone();
    let date = |seconds: i64, nanos: i32, venue: &str, price: i64| pb::AddScheduleRequest {
        concert_id: concert_id.clone(),
        start_time: Some(prost_types::Timestamp { seconds, nanos }),
        venue: venue.into(),
        seat_count: 20,
        sections: vec![pb::PriceSection {
            name: "R".into(),
            first_seat: 1,
            last_seat: 20,
            price,
        }],
        request_id: "encore-night".into(),
    };
    let dates_in_database = || {
        mesh.database.row::<(i64, i64)>(
            "SELECT (SELECT count(*) FROM concert.schedules), (SELECT count(*) FROM concert.seats)",
        )
    };
    let before = dates_in_database().await;

    // Instants a Timestamp cannot hold (chrono could, Postgres could not): bad input, not a
    // database error.
    for (seconds, nanos) in [
        (-8_000_000_000_000, 0),
        (253_402_300_800, 0),
        (1_900_000_000, -1),
    ] {
        let refused = admin
            .add_schedule(date(seconds, nanos, "Olympic Hall", 90_000))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{seconds}.{nanos}: {refused:?}"
        );
        assert_eq!(reason(&refused), "INVALID_FIELD");
    }
    assert_eq!(dates_in_database().await, before);

    // A retry gets the same date; the same key for another date is refused, whatever differs.
    let mut schedule_ids = Vec::new();
    for _ in 0..2 {
        let added = admin
            .add_schedule(date(1_900_000_000, 0, "Olympic Hall", 90_000))
            .await
            .unwrap()
            .into_inner()
            .schedule
            .unwrap();
        schedule_ids.push(added.schedule_id);
    }
    assert_eq!(schedule_ids[0], schedule_ids[1]);
    let after = dates_in_database().await;
    assert_eq!(after, (before.0 + 1, before.1 + 20));
    for other in [
        date(1_900_003_600, 0, "Olympic Hall", 90_000),
        date(1_900_000_000, 0, "Gocheok Dome", 90_000),
        date(1_900_000_000, 0, "Olympic Hall", 95_000),
    ] {
        let refused = admin.add_schedule(other).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert_eq!(reason(&refused), "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(dates_in_database().await, after);
}

#[tokio::test]
async fn control_characters_in_free_text_are_bad_input_and_open_no_line() {
    use tonic_types::StatusExt;

    let mesh = mesh(1, |_, _| {}).await;
    let (concert_id, _) = mesh.catalog(10).await;
    let mut admin = mesh.concerts[0].admin.clone();
    let rows = || {
        mesh.database.row::<(i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM concert.concerts), (SELECT count(*) FROM concert.schedules),
                    (SELECT count(*) FROM queue.lines)",
        )
    };
    let before = rows().await;
    let concert = |title: &str, artist: &str| pb::CreateConcertRequest {
        title: title.into(),
        artist: artist.into(),
        request_id: "create-with-control-characters".into(),
    };
    let date = |venue: &str, section: &str| pb::AddScheduleRequest {
        concert_id: concert_id.clone(),
        start_time: Some(prost_types::Timestamp {
            seconds: 1_900_000_000,
            nanos: 0,
        }),
        venue: venue.into(),
        seat_count: 10,
        sections: vec![pb::PriceSection {
            name: section.into(),
            first_seat: 1,
            last_seat: 10,
            price: 90_000,
        }],
        request_id: "date-with-control-characters".into(),
    };
    // U+0000 is what Postgres itself refuses (before this check: INTERNAL, and CreateConcert
    // had already opened a queue line for the concert it then failed to create).
    let refusals = [
        (
            "title",
            admin
                .create_concert(concert("Live\0Tour", "Band"))
                .await
                .unwrap_err(),
        ),
        (
            "artist",
            admin
                .create_concert(concert("Live", "Band\u{1b}[31m"))
                .await
                .unwrap_err(),
        ),
        (
            "venue",
            admin.add_schedule(date("Hall\0", "R")).await.unwrap_err(),
        ),
        (
            "sections.name",
            admin
                .add_schedule(date("Hall", "R\nVIP"))
                .await
                .unwrap_err(),
        ),
        // Not category Cc, but they break or reorder printed text: a line separator, and a
        // right-to-left override that makes "VIP" display as something else.
        (
            "title",
            admin
                .create_concert(concert("Live\u{2028}Tour", "Band"))
                .await
                .unwrap_err(),
        ),
        (
            "venue",
            admin
                .add_schedule(date("Hall \u{202e}PIV", "R"))
                .await
                .unwrap_err(),
        ),
        (
            "sections.name",
            admin
                .add_schedule(date("Hall", "R\u{2066}"))
                .await
                .unwrap_err(),
        ),
    ];
    for (field, status) in refusals {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(reason(&status), "INVALID_FIELD", "{field}");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("field").map(String::as_str), Some(field));
    }
    assert_eq!(rows().await, before, "nothing written, no line opened");
}

#[tokio::test]
async fn list_concerts_pages_through_the_concerts_on_sale_in_creation_order() {
    let mesh = mesh(1, |_, _| {}).await;
    let admin = mesh.concerts[0].admin.clone();
    let days_from_now = |days: i64| prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + days * 86_400,
        nanos: 0,
    };
    // A concert with a date on each of `days` (negative: already started).
    let concert = |name: &'static str, days: &'static [i64]| {
        let mut admin = admin.clone();
        async move {
            let concert = admin
                .create_concert(pb::CreateConcertRequest {
                    title: format!("{name} live"),
                    artist: name.into(),
                    request_id: format!("concert-{name}"),
                })
                .await
                .unwrap()
                .into_inner()
                .concert
                .unwrap();
            for day in days {
                admin
                    .add_schedule(pb::AddScheduleRequest {
                        concert_id: concert.concert_id.clone(),
                        start_time: Some(days_from_now(*day)),
                        venue: "Olympic Hall".into(),
                        seat_count: 5,
                        sections: vec![pb::PriceSection {
                            name: "R".into(),
                            first_seat: 1,
                            last_seat: 5,
                            price: 90_000,
                        }],
                        request_id: format!("date-{name}-{day}"),
                    })
                    .await
                    .unwrap();
            }
            concert.concert_id
        }
    };
    let first = concert("first", &[30]).await;
    let _over = concert("over", &[-1, -2]).await;
    let _announced = concert("announced", &[]).await;
    let second = concert("second", &[30, 31]).await;
    let last_dates = concert("last-dates", &[-1, 2]).await;

    let public = mesh.concerts[0].public.clone();
    let page = |page_size: i32, page_token: String| {
        let mut public = public.clone();
        async move {
            public
                .list_concerts(pb::ListConcertsRequest {
                    page_size,
                    page_token,
                })
                .await
                .map(|response| response.into_inner())
        }
    };
    let everything = page(0, String::new()).await.unwrap();
    let ids = |page: &pb::ListConcertsResponse| {
        page.concerts
            .iter()
            .map(|concert| concert.concert_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&everything),
        [first.as_str(), second.as_str(), last_dates.as_str()]
    );
    assert_eq!(everything.next_page_token, "");
    assert_eq!(everything.concerts[1].title, "second live");
    assert_eq!(everything.concerts[1].artist, "second");

    // One at a time. Between pages, the first concert's date starts (it goes off sale) and
    // a new concert is created: an offset would now skip `second`; the page token does not.
    let one = page(1, String::new()).await.unwrap();
    assert_eq!(ids(&one), [first.as_str()]);
    let database = mesh.database.admin().await;
    sqlx::query(
        "UPDATE concert.schedules SET start_time = now() - interval '1 minute'
          WHERE concert_id = $1",
    )
    .bind(&first)
    .execute(&database)
    .await
    .unwrap();
    database.close().await;
    let newest = concert("newest", &[60]).await;
    let mut listed = ids(&one);
    let mut token = one.next_page_token;
    while !token.is_empty() {
        let next = page(1, token).await.unwrap();
        assert!(next.concerts.len() <= 1);
        listed.extend(ids(&next));
        token = next.next_page_token;
    }
    assert_eq!(
        listed,
        [
            first.as_str(),
            second.as_str(),
            last_dates.as_str(),
            newest.as_str()
        ]
    );
    assert_eq!(
        ids(&page(0, String::new()).await.unwrap()),
        [second.as_str(), last_dates.as_str(), newest.as_str()]
    );

    // Bad paging input is refused, naming the field.
    for (page_size, page_token, field) in [
        (0, "o1", "page_token"),
        (0, "c123:", "page_token"),
        (0, "junk", "page_token"),
        (-1, "", "page_size"),
        (101, "", "page_size"),
    ] {
        let refused = page(page_size, page_token.into()).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{page_token:?}");
        assert_eq!(reason(&refused), "INVALID_FIELD");
        use tonic_types::StatusExt;
        let info = refused.get_details_error_info().unwrap();
        assert_eq!(info.metadata["field"], field);
    }
}
