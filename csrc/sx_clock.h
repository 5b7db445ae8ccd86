/* sx_clock.h — monotonic time in seconds (double) for scheduling.
 *
 * Everything the engine schedules (deadlines, token refills, cool-downs, retry due times) is
 * expressed on CLOCK_MONOTONIC so wall-clock jumps never stall or flood the scheduler. Doubles
 * hold nanosecond resolution for centuries of uptime, and keep the rate arithmetic readable. */
#ifndef SEMEX_CLOCK_H
#define SEMEX_CLOCK_H

#include <time.h>

static inline double sx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Wall clock, only for converting an HTTP-date (Retry-After) into a delay. */
static inline double sx_wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
