-- Which view an event was parked in: the live view (`view_<projection>`) or a rebuild's new one
-- (`view_<projection>_next`). A rebuild's swap keeps exactly the events its new view parked: an
-- event the live projector parked while the rebuild ran, and the rebuild applied, is no longer
-- parked. Rows of earlier builds were parked in the live view.
ALTER TABLE parked_events ADD COLUMN parked_in text;
UPDATE parked_events SET parked_in = 'view_' || projection;
ALTER TABLE parked_events ALTER COLUMN parked_in SET NOT NULL;
ALTER TABLE parked_events DROP CONSTRAINT parked_events_pkey;
ALTER TABLE parked_events ADD PRIMARY KEY (projection, stream, seq, parked_in);
