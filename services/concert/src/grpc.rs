//! The concert service's gRPC surface: the public ConcertService (behind a queue token),
//! the internal service the payment saga calls, and the catalog admin service.

use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use stagedoor_proto::concert::v1::{
    self as pb, concert_admin_service_server::ConcertAdminService,
    concert_internal_service_server::ConcertInternalService,
    concert_service_server::ConcertService,
};
use stagedoor_runtime::{
    auth::{Fan, TokenValidator},
    batch::{Batcher, SharedReads},
    time, validate, ApiError,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    domain::{ConcertError, MAX_SEATS_PER_FAN},
    lines::QueueLines,
    store::{self, HoldRow, NewSeat, ScheduleRow},
};

/// Everything a handler needs.
pub struct ConcertState {
    pub pool: PgPool,
    /// Dates never change once added: each replica keeps those it has read.
    pub dates: std::sync::Mutex<std::collections::HashMap<String, ScheduleRow>>,
    pub tokens: TokenValidator,
    /// How long a hold keeps its seats: also how long after its window's end a fan's token
    /// may still release holds (see ReleaseHold).
    pub hold_ttl: std::time::Duration,
    /// HoldSeats' batching worker (see `app::spawn_hold_writes`).
    pub holds: Batcher<store::HoldRequest, HoldRow>,
    /// ConfirmHold's batching worker (the same).
    pub confirms: Batcher<store::ConfirmRequest, HoldRow>,
    pub reads: Reads,
    /// Opens a new concert's waiting room at the queue.
    pub lines: QueueLines,
}

/// The reads a rush repeats, coalesced: fans browsing one date at the same moment share one
/// read of its seats, one at a time per date (each read starts after the calls it answers
/// arrived, so no answer is older than its call), and GetHolds that arrive together are one
/// `hold_id = ANY($1)`.
pub struct Reads {
    /// A date's seat map with each seat's status, by schedule id.
    pub seat_maps: SharedReads<String, Vec<store::SeatRow>>,
    /// A concert's dates that still have a free seat, by concert id; `None`: no such concert.
    pub open_dates: SharedReads<String, Option<Vec<store::DateWithSeats>>>,
    /// Holds by id.
    pub holds: Batcher<Uuid, Option<HoldRow>>,
}

/// Implements the three concert services over one shared state.
#[derive(Clone)]
pub struct ConcertApi {
    state: Arc<ConcertState>,
}

impl ConcertApi {
    pub fn new(state: ConcertState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }

    /// The fan of a call that needs an ACTIVE token of `concert_id`.
    async fn fan_of<T>(&self, request: &Request<T>) -> Result<Fan, ApiError> {
        self.state.tokens.fan(request.metadata()).await
    }

    /// A date of the fan's concert. A date of another concert is PERMISSION_DENIED /
    /// TOKEN_WRONG_CONCERT: the token admits to one concert only.
    async fn schedule_for(
        &self,
        fan: &Fan,
        schedule_id: &str,
    ) -> Result<ScheduleRow, ConcertError> {
        let schedule_id = validate::id("schedule_id", schedule_id)?;
        let known = self
            .state
            .dates
            .lock()
            .expect("date cache poisoned")
            .get(schedule_id)
            .cloned();
        let found = match known {
            Some(schedule) => Some(schedule),
            None => {
                let read = store::schedule(&self.state.pool, schedule_id).await?;
                if let Some(schedule) = &read {
                    let mut dates = self.state.dates.lock().expect("date cache poisoned");
                    if dates.len() >= 100_000 {
                        dates.clear();
                    }
                    dates.insert(schedule_id.to_owned(), schedule.clone());
                }
                read
            }
        };
        match found {
            Some(schedule) if schedule.concert_id == fan.concert_id => Ok(schedule),
            Some(schedule) => Err(ConcertError::WrongConcert {
                token_concert: fan.concert_id.clone(),
                concert: schedule.concert_id,
            }),
            None => Err(ConcertError::ScheduleNotFound(schedule_id.to_owned())),
        }
    }
}

fn parse_hold_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text)
        .map_err(|_| ApiError::invalid_field("hold_id", "hold_id is not a hold id"))
}

fn schedule_to_proto(schedule: &ScheduleRow, available: i64) -> pb::Schedule {
    pb::Schedule {
        schedule_id: schedule.schedule_id.clone(),
        concert_id: schedule.concert_id.clone(),
        start_time: Some(time::timestamp(schedule.start_time)),
        venue: schedule.venue.clone(),
        seat_count: schedule.seat_count,
        available_seat_count: available as i32,
    }
}

fn hold_to_proto(hold: &HoldRow) -> pb::Hold {
    let status = match hold.status.as_str() {
        "HELD" => pb::HoldStatus::Held,
        "CONFIRMED" => pb::HoldStatus::Confirmed,
        "RELEASED" => pb::HoldStatus::Released,
        // A HELD hold past its time (by the clock), or one the sweeper retired.
        _ => pb::HoldStatus::Expired,
    };
    pb::Hold {
        hold_id: hold.hold_id.to_string(),
        schedule_id: hold.schedule_id.clone(),
        concert_id: hold.concert_id.clone(),
        user_id: hold.user_id.clone(),
        seat_numbers: hold.seat_numbers.clone(),
        total_price: hold.total_price,
        status: status as i32,
        expire_time: Some(time::timestamp(hold.expire_time)),
        create_time: Some(time::timestamp(hold.create_time)),
        payment_id: hold.payment_id.clone().unwrap_or_default(),
        start_time: Some(time::timestamp(hold.start_time)),
        retired: hold.retired,
    }
}

/// Checks the seats of a hold request against the date: 1 to 4, distinct, in 1..=seat_count.
/// Returns them ascending.
fn checked_seats(seat_numbers: &[i32], seat_count: i32) -> Result<Vec<i32>, ApiError> {
    if seat_numbers.is_empty() || seat_numbers.len() > MAX_SEATS_PER_FAN {
        return Err(ApiError::invalid_field(
            "seat_numbers",
            format!(
                "hold 1 to {MAX_SEATS_PER_FAN} seats at once, got {}",
                seat_numbers.len()
            ),
        ));
    }
    let mut seats = seat_numbers.to_vec();
    seats.sort_unstable();
    if let Some(bad) = seats.iter().find(|n| !(1..=seat_count).contains(*n)) {
        return Err(ApiError::invalid_field(
            "seat_numbers",
            format!("seat {bad} does not exist; this date has seats 1 to {seat_count}"),
        ));
    }
    if seats.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(ApiError::invalid_field(
            "seat_numbers",
            "a seat is listed twice",
        ));
    }
    Ok(seats)
}

#[tonic::async_trait]
impl ConcertService for ConcertApi {
    async fn list_concerts(
        &self,
        request: Request<pb::ListConcertsRequest>,
    ) -> Result<Response<pb::ListConcertsResponse>, Status> {
        let request = request.into_inner();
        let page_size = validate::page_size(request.page_size, 20, 100)?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(parse_concert_cursor(token).ok_or_else(|| {
                ApiError::invalid_field(
                    "page_token",
                    "page_token must be a next_page_token that ListConcerts returned",
                )
            })?),
        };
        // One more than the page, to know whether another page follows.
        let mut concerts = store::concerts_on_sale(&self.state.pool, after.as_ref(), page_size + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if concerts.len() as i64 > page_size {
            concerts.truncate(page_size as usize);
            concerts.last().map(concert_cursor).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListConcertsResponse {
            concerts: concerts
                .into_iter()
                .map(|concert| pb::Concert {
                    concert_id: concert.concert_id,
                    title: concert.title,
                    artist: concert.artist,
                    create_time: Some(time::timestamp(concert.create_time)),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn list_available_dates(
        &self,
        request: Request<pb::ListAvailableDatesRequest>,
    ) -> Result<Response<pb::ListAvailableDatesResponse>, Status> {
        let fan = self.fan_of(&request).await?;
        let concert_id = validate::id("concert_id", &request.get_ref().concert_id)?;
        if concert_id != fan.concert_id {
            return Err(ConcertError::WrongConcert {
                token_concert: fan.concert_id,
                concert: concert_id.to_owned(),
            }
            .into());
        }
        let open_dates = self
            .state
            .reads
            .open_dates
            .call(concert_id.to_owned())
            .await?;
        let Some(schedules) = open_dates.as_ref() else {
            return Err(ConcertError::ConcertNotFound(concert_id.to_owned()).into());
        };
        Ok(Response::new(pb::ListAvailableDatesResponse {
            schedules: schedules
                .iter()
                .map(|date| schedule_to_proto(&date.schedule, date.available))
                .collect(),
        }))
    }

    async fn list_available_seats(
        &self,
        request: Request<pb::ListAvailableSeatsRequest>,
    ) -> Result<Response<pb::ListAvailableSeatsResponse>, Status> {
        let fan = self.fan_of(&request).await?;
        let schedule = self
            .schedule_for(&fan, &request.get_ref().schedule_id)
            .await?;
        // A date that has started is off sale. By this process's clock: a listing is only
        // advice, HoldSeats decides by the database's clock (store::hold_batch).
        if schedule.start_time <= Utc::now() {
            return Err(ConcertError::SaleClosed {
                schedule_id: schedule.schedule_id,
                start_time: schedule.start_time,
            }
            .into());
        }
        let seats = self
            .state
            .reads
            .seat_maps
            .call(schedule.schedule_id.clone())
            .await?;
        let available = seats
            .iter()
            .filter(|seat| seat.status == "AVAILABLE")
            .count() as i64;
        Ok(Response::new(pb::ListAvailableSeatsResponse {
            schedule: Some(schedule_to_proto(&schedule, available)),
            seats: seats
                .iter()
                .map(|seat| {
                    let status = match seat.status.as_str() {
                        "SOLD" => pb::SeatStatus::Sold,
                        "HELD" => pb::SeatStatus::Held,
                        _ => pb::SeatStatus::Available,
                    };
                    pb::Seat {
                        seat_number: seat.seat_number,
                        status: status as i32,
                        price: seat.price,
                        section: seat.section.clone(),
                    }
                })
                .collect(),
        }))
    }

    async fn hold_seats(
        &self,
        request: Request<pb::HoldSeatsRequest>,
    ) -> Result<Response<pb::HoldSeatsResponse>, Status> {
        let fan = self.fan_of(&request).await?;
        let request = request.into_inner();
        let request_id = validate::id("request_id", &request.request_id)?;
        let schedule = self.schedule_for(&fan, &request.schedule_id).await?;
        let seats = checked_seats(&request.seat_numbers, schedule.seat_count)?;
        // Coalesced with the holds that arrive at the same moment: one transaction for all
        // of them (store::hold_batch), each still all or none.
        let hold = self
            .state
            .holds
            .call(store::HoldRequest {
                schedule_id: schedule.schedule_id,
                concert_id: schedule.concert_id,
                user_id: fan.user_id,
                seat_numbers: seats,
                request_id: request_id.to_owned(),
                start_time: schedule.start_time,
            })
            .await?;
        Ok(Response::new(pb::HoldSeatsResponse {
            hold: Some(hold_to_proto(&hold)),
        }))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        // Any token the queue issued to the fan, not only an ACTIVE one: giving seats back
        // takes nothing from anyone, and a fan whose payment completed the token (DONE) must
        // still be able to free the other holds it has, rather than keep their seats from
        // everyone until they expire.
        let fan = self
            .state
            .tokens
            .owner(request.metadata(), self.state.hold_ttl)
            .await?;
        let hold_id = parse_hold_id(&request.get_ref().hold_id)?;
        let hold = store::release(&self.state.pool, hold_id, &fan.user_id, &fan.concert_id).await?;
        Ok(Response::new(pb::ReleaseHoldResponse {
            hold: Some(hold_to_proto(&hold)),
        }))
    }
}

#[tonic::async_trait]
impl ConcertInternalService for ConcertApi {
    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        let hold_id = parse_hold_id(&request.get_ref().hold_id)?;
        let hold = self
            .state
            .reads
            .holds
            .call(hold_id)
            .await?
            .ok_or_else(|| ConcertError::HoldNotFound(hold_id.to_string()))?;
        Ok(Response::new(pb::GetHoldResponse {
            hold: Some(hold_to_proto(&hold)),
        }))
    }

    async fn confirm_hold(
        &self,
        request: Request<pb::ConfirmHoldRequest>,
    ) -> Result<Response<pb::ConfirmHoldResponse>, Status> {
        let request = request.into_inner();
        let hold_id = parse_hold_id(&request.hold_id)?;
        let payment_id = validate::id("payment_id", &request.payment_id)?;
        let hold = self
            .state
            .confirms
            .call(store::ConfirmRequest {
                hold_id,
                payment_id: payment_id.to_owned(),
            })
            .await?;
        Ok(Response::new(pb::ConfirmHoldResponse {
            hold: Some(hold_to_proto(&hold)),
        }))
    }
}

/// Longest title, artist or venue.
const MAX_TEXT: usize = 200;
/// Most seats of one date.
const MAX_SEATS: i32 = 1_000;
/// Highest price of one seat (won).
const MAX_PRICE: i64 = 10_000_000;

fn text<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ApiError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_TEXT {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} must be 1 to {MAX_TEXT} characters"),
        ));
    }
    // Postgres text cannot hold U+0000 at all (the insert would fail as an INTERNAL error,
    // after CreateConcert had already opened a queue line), and no title, name or venue
    // needs a line break, tab or escape sequence to be printed on a ticket. Nor the Unicode
    // line and paragraph separators, or the bidirectional embeddings, overrides and isolates
    // that make text display in another order than it reads (the set rustc warns about in
    // source). The marks U+200E/U+200F pass: mixed-direction names need them.
    if let Some(bad) = value.chars().find(|&c| c.is_control() || breaks_display(c)) {
        return Err(ApiError::invalid_field(
            field,
            format!("{field} may not hold control characters, found {bad:?}"),
        ));
    }
    Ok(value)
}

/// Characters outside category Cc that still change how text is laid out when printed.
fn breaks_display(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The seat map of a new date: every seat in exactly one section.
fn seat_map(seat_count: i32, sections: &[pb::PriceSection]) -> Result<Vec<NewSeat>, ApiError> {
    let seat_count = if seat_count == 0 { 50 } else { seat_count };
    if !(1..=MAX_SEATS).contains(&seat_count) {
        return Err(ApiError::invalid_field(
            "seat_count",
            format!("seat_count must be 1 to {MAX_SEATS}"),
        ));
    }
    if sections.is_empty() {
        return Ok((0..seat_count)
            .map(|_| NewSeat {
                section: "R".into(),
                price: 100_000,
            })
            .collect());
    }
    let mut seats: Vec<Option<NewSeat>> = (0..seat_count).map(|_| None).collect();
    for section in sections {
        let name = text("sections.name", &section.name)?;
        if !(1..=MAX_PRICE).contains(&section.price) {
            return Err(ApiError::invalid_field(
                "sections.price",
                format!("a price is 1 to {MAX_PRICE} won"),
            ));
        }
        if section.first_seat < 1
            || section.last_seat > seat_count
            || section.first_seat > section.last_seat
        {
            return Err(ApiError::invalid_field(
                "sections",
                format!("section {name} is outside seats 1 to {seat_count}"),
            ));
        }
        for number in section.first_seat..=section.last_seat {
            let slot = &mut seats[(number - 1) as usize];
            if slot.is_some() {
                return Err(ApiError::invalid_field(
                    "sections",
                    format!("seat {number} is in two sections"),
                ));
            }
            *slot = Some(NewSeat {
                section: name.to_owned(),
                price: section.price,
            });
        }
    }
    seats
        .into_iter()
        .enumerate()
        .map(|(index, seat)| {
            seat.ok_or_else(|| {
                ApiError::invalid_field("sections", format!("seat {} has no section", index + 1))
            })
        })
        .collect()
}

#[tonic::async_trait]
impl ConcertAdminService for ConcertApi {
    async fn create_concert(
        &self,
        request: Request<pb::CreateConcertRequest>,
    ) -> Result<Response<pb::CreateConcertResponse>, Status> {
        let request = request.into_inner();
        let title = text("title", &request.title)?;
        let artist = text("artist", &request.artist)?;
        let request_id = validate::id("request_id", &request.request_id)?;
        let concert = match store::concert_by_request(&self.state.pool, request_id)
            .await
            .map_err(ApiError::from)?
        {
            // Asked again: the concert (and its line) exists already.
            Some(concert) => store::same_concert(concert, title, artist)?,
            None => {
                // The line opens before the concert exists: whoever sees a concert can queue
                // for it. Should the insert fail after this, the line opened is an empty one
                // under an id nobody knows, which no admission ever visits.
                let concert_id = store::new_concert_id();
                self.state
                    .lines
                    .open(std::slice::from_ref(&concert_id))
                    .await?;
                store::create_concert(&self.state.pool, &concert_id, title, artist, request_id)
                    .await?
            }
        };
        Ok(Response::new(pb::CreateConcertResponse {
            concert: Some(pb::Concert {
                concert_id: concert.concert_id,
                title: concert.title,
                artist: concert.artist,
                create_time: Some(time::timestamp(concert.create_time)),
            }),
        }))
    }

    async fn add_schedule(
        &self,
        request: Request<pb::AddScheduleRequest>,
    ) -> Result<Response<pb::AddScheduleResponse>, Status> {
        let request = request.into_inner();
        let concert_id = validate::id("concert_id", &request.concert_id)?;
        let request_id = validate::id("request_id", &request.request_id)?;
        let venue = text("venue", &request.venue)?;
        let start_time = request
            .start_time
            .as_ref()
            .and_then(time::from_timestamp)
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "start_time",
                    "start_time is required, within years 0001 to 9999",
                )
            })?;
        let seats = seat_map(request.seat_count, &request.sections)?;
        if !store::concert_exists(&self.state.pool, concert_id)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ConcertError::ConcertNotFound(concert_id.to_owned()).into());
        }
        let schedule = store::add_schedule(
            &self.state.pool,
            concert_id,
            start_time,
            venue,
            &seats,
            request_id,
        )
        .await?;
        Ok(Response::new(pb::AddScheduleResponse {
            schedule: Some(schedule_to_proto(&schedule.schedule, schedule.available)),
        }))
    }
}

/// The page token that continues a ListConcerts listing after `last`: `c<creation time in
/// microseconds since the epoch, Postgres' precision>:<concert id>`. Opaque to clients.
fn concert_cursor(last: &store::ConcertRow) -> String {
    format!(
        "c{}:{}",
        last.create_time.timestamp_micros(),
        last.concert_id
    )
}

/// The position a [`concert_cursor`] token names; `None` for anything else.
fn parse_concert_cursor(token: &str) -> Option<store::ConcertCursor> {
    let (micros, concert_id) = token.strip_prefix('c')?.split_once(':')?;
    // Within Postgres' range too: a token made up with year -7500 is bad input, not INTERNAL.
    let create_time = time::in_range(chrono::DateTime::from_timestamp_micros(
        micros.parse().ok()?,
    )?)?;
    validate::id("page_token", concert_id).ok()?;
    Some(store::ConcertCursor {
        create_time,
        concert_id: concert_id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concert_page_tokens_round_trip_and_refuse_anything_else() {
        let last = store::ConcertRow {
            concert_id: "concert-1:a".into(),
            title: String::new(),
            artist: String::new(),
            create_time: chrono::DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap(),
        };
        let token = concert_cursor(&last);
        assert_eq!(
            parse_concert_cursor(&token),
            Some(store::ConcertCursor {
                create_time: last.create_time,
                concert_id: last.concert_id,
            })
        );
        for junk in [
            "",
            "c",
            "c1",
            "c1:",
            "cx:a",
            "o20",
            "1800000000123456:a",
            "c1: a",
            "c-300000000000000000:a",
        ] {
            assert_eq!(parse_concert_cursor(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn seat_checks() {
        assert_eq!(checked_seats(&[3, 1], 50).unwrap(), vec![1, 3]);
        assert!(checked_seats(&[], 50).is_err());
        assert!(checked_seats(&[1, 2, 3, 4, 5], 50).is_err());
        assert!(checked_seats(&[0], 50).is_err());
        assert!(checked_seats(&[51], 50).is_err());
        assert!(checked_seats(&[7, 7], 50).is_err());
    }

    #[test]
    fn seat_maps_cover_every_seat_once() {
        let section = |name: &str, first_seat, last_seat, price| pb::PriceSection {
            name: name.into(),
            first_seat,
            last_seat,
            price,
        };
        let map = seat_map(
            4,
            &[section("VIP", 1, 2, 150_000), section("R", 3, 4, 90_000)],
        )
        .unwrap();
        assert_eq!(
            map.iter().map(|s| s.price).collect::<Vec<_>>(),
            vec![150_000, 150_000, 90_000, 90_000]
        );
        assert!(
            seat_map(4, &[section("VIP", 1, 2, 150_000)]).is_err(),
            "seats 3-4 uncovered"
        );
        assert!(
            seat_map(4, &[section("A", 1, 3, 1), section("B", 3, 4, 1)]).is_err(),
            "overlap"
        );
        assert_eq!(seat_map(0, &[]).unwrap().len(), 50);
    }
}
