-- No compression on the write path: artifact contents stay in the table's pages up to a
-- page, uncompressed, as event payloads do since migration 0007; larger contents and
-- payloads go out of line uncompressed instead of through pglz.
--
-- A profile of `bench pipeline` under load found pglz_compress at 13% of PostgreSQL's CPU
-- (5.7% of the machine's): artifact contents above about 2 kB (most source files a team
-- writes), and the few model answers above a page. This build of PostgreSQL has no lz4.
-- The price is disk: contents take their full size. Rows already stored keep their form.
ALTER TABLE artifacts SET (toast_tuple_target = 8160);
ALTER TABLE artifacts ALTER COLUMN content SET STORAGE EXTERNAL;
ALTER TABLE events ALTER COLUMN payload SET STORAGE EXTERNAL;
