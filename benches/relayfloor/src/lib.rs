use std::net::{SocketAddr, TcpListener};

pub struct Args {
    pub listen: u16,
    pub upstream: SocketAddr,
    pub mode: String,
    pub entries: u32,
}

pub fn args() -> Args {
    let mut a = std::env::args().skip(1);
    let (mut listen, mut upstream, mut mode, mut entries) =
        (None, None, String::from("plain"), 4096u32);
    while let Some(k) = a.next() {
        let v = a.next().expect("missing value");
        match k.as_str() {
            "--listen" => listen = Some(v.parse().unwrap()),
            "--upstream" => {
                use std::net::ToSocketAddrs;
                upstream = Some(v.to_socket_addrs().unwrap().next().unwrap())
            }
            "--mode" => mode = v,
            "--entries" => entries = v.parse().unwrap(),
            _ => panic!("unknown arg {k}"),
        }
    }
    Args {
        listen: listen.expect("--listen"),
        upstream: upstream.expect("--upstream"),
        mode,
        entries,
    }
}

pub fn listener(port: u16) -> TcpListener {
    
    TcpListener::bind(("127.0.0.1", port)).expect("bind")
}

pub fn nodelay(fd: i32) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const _,
            4,
        );
    }
}
