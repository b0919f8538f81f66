-- Events up to a page stay in the table's own pages, uncompressed.
--
-- PostgreSQL compresses (pglz) any row above about 2 kB, and model calls carry whole model
-- answers (3-12 kB): compressing each as it is appended, and decompressing it on every read
-- (the relay, a worker's view of its run, audit, replay), was the largest single cost in the
-- database under load. With the target at a page (8160 bytes) a row is compressed only past
-- that. The price is disk: payloads between 2 and 8 kB take their full size.
-- Rows already stored keep their form; this applies to rows appended from now on.
ALTER TABLE events SET (toast_tuple_target = 8160);
