# Generates N invoice rows shaped like a real company's books (canonical column names):
#   awk -v n=1000000 -v seed=7 -f gen_books.awk
# - issue dates over two years (2023-01-01 .. 2024-12-31), more of them in later months;
# - 5,000 customers whose activity is skewed (a few large accounts issue most invoices),
#   each billed in its own currency (60% USD, 25% EUR, 15% GBP);
# - amounts spread over four orders of magnitude (cents kept);
# - terms of 15, 30, 45 or 60 days; about 40% paid, 35% part-paid, the rest open;
# - updated_at between issue and issue + 90 days;
# - about 1% bad rows (balance above total). Ids never repeat, so a plain COPY accepts it.
function ymd(d,    y, m, len) {
    y = 2023
    while (1) {
        len = (y % 4 == 0) ? 366 : 365
        if (d < len) break
        d -= len; y++
    }
    for (m = 1; m <= 12; m++) {
        len = mdays[m] + ((m == 2 && y % 4 == 0) ? 1 : 0)
        if (d < len) break
        d -= len
    }
    return sprintf("%04d-%02d-%02d", y, m, d + 1)
}
BEGIN {
    if (seed == "") seed = 7
    srand(seed)
    split("31 28 31 30 31 30 31 31 30 31 30 31", mdays, " ")
    split("15 30 45 60", terms, " ")
    print "external_id,doc_number,customer_id,customer_name,issue_date,due_date,currency,total,balance,status,kind,updated_at"
    for (i = 0; i < n; i++) {
        # Skewed customers: the square of a uniform draw favours low ids.
        u = rand()
        c = int(u * u * 5000)
        cc = (c % 20 < 12) ? "USD" : (c % 20 < 17) ? "EUR" : "GBP"
        # Later days more likely: the square root of a uniform draw.
        day = int(sqrt(rand()) * 730)
        due = day + terms[1 + int(rand() * 4)]
        cents = int(exp(log(10) * (1 + rand() * 4)) * 100)
        p = rand()
        if (i % 100 == 7) balance = cents + 1000
        else if (p < 0.40) balance = 0
        else if (p < 0.75) balance = int(cents * rand())
        else balance = cents
        status = (balance == 0) ? "paid" : "open"
        upd = day + int(rand() * 90)
        printf "INV-%08d,%d,C-%05d,Customer %05d,%s,%s,%s,%d.%02d,%d.%02d,%s,invoice,%sT%02d:%02d:%02dZ\n", \
            i, 100000 + i, c, c, ymd(day), ymd(due), cc, int(cents / 100), cents % 100, \
            int(balance / 100), balance % 100, status, ymd(upd), int(rand() * 24), int(rand() * 60), int(rand() * 60)
    }
}
