-- What the correction cost, when `aligner serve --aligner-price INPUT,OUTPUT` gave the
-- Aligner's price (USD per million input and output tokens): the proxy's overhead in money.
ALTER TABLE proxy_records ADD COLUMN aligner_cost_usd REAL;
