# Generates N invoice rows with canonical column names: awk -v n=1000000 -f gen_invoices.awk
# About 1% of rows are bad (balance above total) and 2% repeat the previous id
# (-v dups=0: none repeat, so a plain COPY into a table with a primary key accepts the file).
BEGIN {
    if (dups == "") dups = 1
    print "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at"
    split("USD EUR GBP", cur, " ")
    for (i = 0; i < n; i++) {
        id = (dups && i % 50 == 49) ? i - 1 : i
        day = 1 + (i % 28)
        total = 100 + (i * 37) % 100000
        balance = (i % 100 == 7) ? total + 10 : int(total / 2)
        printf "INV-%08d,%d,C-%d,Customer %d,2024-03-%02d,2024-04-%02d,%s,%d.50,%d.25,open,invoice,2024-05-%02dT10:%02d:%02dZ\n", \
            id, id, i % 5000, i % 5000, day, day, cur[1 + i % 3], total, balance, day, i % 60, (i / 60) % 60
    }
}
