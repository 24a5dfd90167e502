/*
 * A wall-clock shift for fault drills: LD_PRELOAD this into a process (redis-server) and its
 * real-time clock reads PYFIQ_CLOCK_SHIFT_MS milliseconds off (negative: behind), while its
 * monotonic clocks stay true, as on a host whose NTP-disciplined clock is simply wrong.
 *
 * Built at test time by pyfiq_harness.clock.build_clock_shim (gcc -shared -fPIC); never shipped as
 * a binary. Linux/glibc only.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long shift_us;
static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *, void *);

__attribute__((constructor)) static void chaos_clock_init(void) {
    const char *ms = getenv("PYFIQ_CLOCK_SHIFT_MS");
    shift_us = ms ? strtoll(ms, NULL, 10) * 1000LL : 0;
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    real_gettimeofday = (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
}

/* Normalises after the shift so callers never see a negative or overflowing sub-second part. */
static void shift_ns(time_t *sec, long *nsec) {
    long long total = (long long)*sec * 1000000000LL + *nsec + shift_us * 1000LL;
    *sec = (time_t)(total / 1000000000LL);
    *nsec = (long)(total % 1000000000LL);
    if (*nsec < 0) {
        *nsec += 1000000000L;
        *sec -= 1;
    }
}

static int is_realtime(clockid_t id) {
    return id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!real_clock_gettime) chaos_clock_init();
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && shift_us && is_realtime(id)) {
        time_t sec = ts->tv_sec;
        long nsec = ts->tv_nsec;
        shift_ns(&sec, &nsec);
        ts->tv_sec = sec;
        ts->tv_nsec = nsec;
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    if (!real_gettimeofday) chaos_clock_init();
    int rc = real_gettimeofday(tv, tz);
    if (rc == 0 && shift_us) {
        time_t sec = tv->tv_sec;
        long nsec = (long)tv->tv_usec * 1000L;
        shift_ns(&sec, &nsec);
        tv->tv_sec = sec;
        tv->tv_usec = (suseconds_t)(nsec / 1000L);
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
