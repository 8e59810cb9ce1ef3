//! The demo catalog, loaded through the concert service's admin API (never its tables).
//! Request ids are fixed per concert and per date, so seeding twice in a month changes
//! nothing (a later month adds that month's dates, see [`seed_dates`]).

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
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
/// Dates of every concert.
const DATES: u64 = 3;

/// The seeded dates: the first days of the month after next, at 19:00 KST (10:00 UTC). A
/// date's sale closes when it starts, so fixed dates would one day leave `stagedoor up`
/// with nothing on sale; these are always a month or two ahead. Within a month they do not
/// change, so seeding again is a no-op; a later month adds its dates beside the old ones.
fn seed_dates(today: NaiveDate) -> Vec<DateTime<Utc>> {
    let month = today.with_day(1).expect("day 1 exists") + Months::new(2);
    (0..DATES)
        .map(|day| {
            (month + Days::new(day))
                .and_hms_opt(10, 0, 0)
                .expect("10:00 exists")
                .and_utc()
        })
        .collect()
}

/// A start time `days` days from now, for the catalogs the demo and the load scenarios make
/// on each run: a month ahead of anything they do, as a date's sale closes when it starts.
pub fn days_ahead(days: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: Utc::now().timestamp() + days * 86_400,
        nanos: 0,
    }
}

/// What was seeded: concert ids with their titles and date ids.
pub struct Seeded {
    pub concerts: Vec<(String, String, Vec<String>)>,
}

/// Loads the demo catalog: three concerts, three dates each, 50 seats per date priced by
/// section (VIP 1-10, R 11-30, S 31-50).
pub async fn seed(concert: Channel) -> Result<Seeded, tonic::Status> {
    let mut admin = ConcertAdminServiceClient::new(concert);
    // Once for the whole catalog, so that a run across midnight at a month's end seeds one
    // month for every concert.
    let starts = seed_dates(Utc::now().date_naive());
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
        for start in &starts {
            let section = |name: &str, first_seat, last_seat, price| PriceSection {
                name: name.into(),
                first_seat,
                last_seat,
                price,
            };
            let schedule = admin
                .add_schedule(AddScheduleRequest {
                    concert_id: created.concert_id.clone(),
                    start_time: Some(stagedoor_runtime::time::timestamp(*start)),
                    venue: venue.into(),
                    seat_count: 50,
                    sections: vec![
                        section("VIP", 1, 10, 150_000),
                        section("R", 11, 30, 120_000),
                        section("S", 31, 50, 90_000),
                    ],
                    // Keyed by the date: another month's seeding adds its own dates.
                    request_id: format!("seed-{key}-{}", start.format("%Y-%m-%d")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_dates_are_ahead_and_stable_within_a_month() {
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        let starts = |today| {
            seed_dates(today)
                .iter()
                .map(|start| start.to_rfc3339())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            starts(day(2026, 12, 2)),
            [
                "2027-02-01T10:00:00+00:00",
                "2027-02-02T10:00:00+00:00",
                "2027-02-03T10:00:00+00:00"
            ]
        );
        assert_eq!(starts(day(2026, 12, 31)), starts(day(2026, 12, 1)));
        assert_eq!(starts(day(2027, 1, 31))[0], "2027-03-01T10:00:00+00:00");
    }
}
