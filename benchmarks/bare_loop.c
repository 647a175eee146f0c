/*
 * The physical limit of an attach+detach cycle: LOOP_CTL_GET_FREE,
 * LOOP_CONFIGURE with autoclear, close (which detaches).  Nothing else.
 * Usage: bare_loop IMAGE SIZE_LIMIT ITERATIONS; prints seconds per cycle.
 */
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    unsigned long long limit = strtoull(argv[2], NULL, 10);
    int iterations = atoi(argv[3]);
    int image = open(argv[1], O_RDWR | O_CLOEXEC);
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (image < 0 || control < 0)
        return perror("open"), 1;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < iterations; i++) {
        for (;;) {
            int number = ioctl(control, LOOP_CTL_GET_FREE);
            char path[32];
            snprintf(path, sizeof path, "/dev/loop%d", number);
            int fd = open(path, O_RDWR | O_CLOEXEC);
            if (fd < 0)
                continue;
            struct loop_config config;
            memset(&config, 0, sizeof config);
            config.fd = (unsigned)image;
            config.info.lo_sizelimit = limit;
            config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
            if (ioctl(fd, LOOP_CONFIGURE, &config) == 0) {
                close(fd);
                break;
            }
            close(fd);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (double)(end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("%.9f\n", seconds / iterations);
    return 0;
}
