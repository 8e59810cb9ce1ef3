-- ListConcerts pages through concerts in creation order and starts each page after the last
-- concert of the one before (a keyset, not an offset): this index serves that order, so a
-- page reads from its starting point instead of from the first concert ever created.
CREATE INDEX concerts_in_listing_order ON concerts (create_time, concert_id);
