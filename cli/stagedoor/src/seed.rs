//! The demo catalog, loaded through the concert service's admin API (never its tables).
//! Request ids are fixed, so seeding twice changes nothing.

use stagedoor_proto::concert::v1::{
    concert_admin_service_client::ConcertAdminServiceClient, AddScheduleRequest,
    CreateConcertRequest, PriceSection,
};
use tonic::transport::Channel;

/// (key, title, artist, venue)
const CONCERTS: [(&str, &str, &str, &str); 3] = [
    ("aurora", "Aurora Nights", "The Lanterns", "Olympic Hall"),
    ("seoul", "Seoul Sessions", "Han River Trio", "Blue Square"),
    ("echo", "Midnight Echo", "Velvet Static", "KSPO Dome"),
];
/// Dates of every concert: 2026-12-18, -19 and -20 at 19:00 KST (10:00 UTC).
const FIRST_DATE: i64 = 1_797_588_000;
const DATES: i64 = 3;

/// What was seeded: concert ids with their titles and date ids.
pub struct Seeded {
    pub concerts: Vec<(String, String, Vec<String>)>,
}

/// Loads the demo catalog: three concerts, three dates each, 50 seats per date priced by
/// section (VIP 1-10, R 11-30, S 31-50).
pub async fn seed(concert: Channel) -> Result<Seeded, tonic::Status> {
    let mut admin = ConcertAdminServiceClient::new(concert);
    let mut concerts = Vec::new();
    for (key, title, artist, venue) in CONCERTS {
        let created = admin
            .create_concert(CreateConcertRequest {
                title: title.into(),
                artist: artist.into(),
                request_id: format!("seed-{key}"),
            })
            .await?
            .into_inner()
            .concert
            .unwrap_or_default();
        let mut dates = Vec::new();
        for day in 0..DATES {
            let section = |name: &str, first_seat, last_seat, price| PriceSection {
                name: name.into(),
                first_seat,
                last_seat,
                price,
            };
            let schedule = admin
                .add_schedule(AddScheduleRequest {
                    concert_id: created.concert_id.clone(),
                    start_time: Some(prost_types::Timestamp {
                        seconds: FIRST_DATE + day * 86_400,
                        nanos: 0,
                    }),
                    venue: venue.into(),
                    seat_count: 50,
                    sections: vec![
                        section("VIP", 1, 10, 150_000),
                        section("R", 11, 30, 120_000),
                        section("S", 31, 50, 90_000),
                    ],
                    request_id: format!("seed-{key}-{day}"),
                })
                .await?
                .into_inner()
                .schedule
                .unwrap_or_default();
            dates.push(schedule.schedule_id);
        }
        concerts.push((created.concert_id, title.to_owned(), dates));
    }
    Ok(Seeded { concerts })
}
